"""Ray job entry point for the monitor: the same code as `embray monitor`.

ray job submit --working-dir . -- \
    python jobs/monitor.py --config embray.yaml [--interval 3600] [--iterations N | --once] \
        [--promote-if-gates-pass] [--json]

Each check: `embray status` (staleness, verify, served version) logged to one MLflow run as metrics
by step and written to <collection>/_status/status.json for the Serve app's gauges; a refresh when
staleness passes monitor.max_stale_fraction; with --promote-if-gates-pass, a promotion through the gates.
"""

from embray.cli import main

if __name__ == "__main__":
    import sys

    main(["monitor", *sys.argv[1:]])
