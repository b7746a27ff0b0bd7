"""Ray job entry point for a refresh: the same code as `embray refresh`.

ray job submit --working-dir . -- \
    python jobs/refresh.py --config embray.yaml [--from VERSION] [--dry-run] [--promote] [--json]
"""

from embray.cli import main

if __name__ == "__main__":
    import sys

    main(["refresh", *sys.argv[1:]])
