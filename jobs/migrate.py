"""Ray job entry point for a migrate: the same code as `embray migrate`.

ray job submit --working-dir . -- python jobs/migrate.py --config embray.yaml --model new-model.yaml [--json]
"""

from embray.cli import main

if __name__ == "__main__":
    import sys

    main(["migrate", *sys.argv[1:]])
