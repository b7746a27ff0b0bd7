"""Ray job entry point for a backfill: the same code as `embray backfill`.

ray job submit --working-dir . -- python jobs/backfill.py --config embray.yaml [--no-promote] [--json]
"""

from embray.cli import main

if __name__ == "__main__":
    import sys

    main(["backfill", *sys.argv[1:]])
