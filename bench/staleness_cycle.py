"""Staleness over a refresh cycle: the monitor's MLflow metrics, plotted.

    .venv/bin/python bench/staleness_cycle.py [--rows 20000] [--steps 16] [--change 0.015] [--write]

Backfills a collection (`hash` backend, so the cycle is about the pipeline, not the model), then for
each step edits --change of the rows (new, changed and deleted, with `updated_at`), and runs one
monitor check (`embray.quality.monitor.check_once`: status -> refresh when the stale fraction passes
monitor.max_stale_fraction -> promotion through the gates), logging it to one MLflow run. The plot
is drawn from that run's metric history, read back from MLflow: docs/img/staleness-cycle.png.
--write also puts the table of checks into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import ROOT, machine, write_section  # noqa: E402 - the sibling benchmark's helpers

MARK_BEGIN = "<!-- bench/staleness_cycle.py begin -->"
MARK_END = "<!-- bench/staleness_cycle.py end -->"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--change", type=float, default=0.015, help="Share of rows edited per step.")
    ap.add_argument("--threshold", type=float, default=0.05, help="monitor.max_stale_fraction")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from embray import Collection
    from embray.config import parse_config

    sys.path.insert(0, str(ROOT))
    from tests.helpers import doc_text, write_with_times

    work = Path(tempfile.mkdtemp(prefix="embray-staleness-"))
    corpus = work / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    clock = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    rows = {f"doc-{i:07d}": doc_text(i) for i in range(args.rows)}
    times = dict.fromkeys(rows, clock)
    write_with_times(corpus, rows, times, files=4)
    col = Collection(
        parse_config(
            {
                "collection": "cycle",
                "source": {"uri": str(corpus)},
                "store": {"uri": str(work / "store")},
                "model": {"backend": "hash", "name": "words", "dims": 64},
                "index": {"shards": 4},
                "embed": {"batch_size": 512},
                "monitor": {"max_stale_fraction": args.threshold, "eval_sample": 100},
            }
        )
    )
    col.backfill()
    registry = col.registry
    run_id = registry.start_job_run("staleness-cycle", {"embray.job": "monitor"}, {"bench": "staleness_cycle"})
    table = []
    next_id = args.rows
    for step in range(args.steps):
        clock += dt.timedelta(hours=6)  # the simulated time of this step's edits
        n = max(1, int(args.rows * args.change))
        ids = rng.sample(sorted(rows), n)
        for i in ids[: n // 2]:  # half edited
            rows[i] += f" revised {step}"
            times[i] = clock
        for i in ids[n // 2 : n // 2 + n // 4]:  # a quarter deleted
            del rows[i]
        for _ in range(n - n // 2 - n // 4):  # the rest new
            rows[f"doc-{next_id:07d}"] = doc_text(next_id) + " new"
            times[f"doc-{next_id:07d}"] = clock
            next_id += 1
        write_with_times(corpus, rows, times, files=4)
        t = time.monotonic()
        st = col.check(promote_if_gates_pass=True)
        seconds = time.monotonic() - t
        m = st.metrics()
        m["refreshed"] = float(bool(st.action.refreshed))
        m["check_seconds"] = seconds
        registry.log_metrics(run_id, m, step=step)
        s = st.staleness
        table.append((step, s.stale, s.fraction, st.action.refreshed is not None, st.ok, seconds))
        print(f"step {step}: stale {s.stale} ({s.fraction:.3%}), refreshed={bool(st.action.refreshed)}")
    registry.end_run(run_id, ok=True)

    hist = registry.client.get_metric_history(run_id, "staleness.fraction")
    refreshed = registry.client.get_metric_history(run_id, "refreshed")
    did = {h.step for h in refreshed if h.value}
    xs, ys = [], []
    for h in sorted(hist, key=lambda h: h.step):  # the check's reading; after a promoted refresh, zero
        xs.append(h.step)
        ys.append(h.value * 100)
        if h.step in did:
            xs.append(h.step)
            ys.append(0.0)
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=110)
    ax.plot(xs, ys, marker="o", label="stale rows of the active version (%)")
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.axhline(args.threshold * 100, color="red", linestyle="--", label=f"max_stale_fraction ({args.threshold:.0%})")
    for h in refreshed:
        if h.value:
            ax.axvline(h.step, color="green", alpha=0.3, linewidth=6)
    ax.plot([], [], color="green", alpha=0.3, linewidth=6, label="refresh + gated promote")
    ax.set_xlabel("monitor check (the source changes by %.1f%% of rows before each)" % (args.change * 100))
    ax.set_ylabel("stale rows (%)")
    ax.set_title(f"embray monitor: staleness of the active version, {args.rows:,} rows")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    out = ROOT / "docs" / "img" / "staleness-cycle.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")

    checks = [r[5] for r in table if not r[3]]
    cycles = [r[5] for r in table if r[3]]
    lines = [
        MARK_BEGIN,
        "## Staleness over a refresh cycle (monitor)",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/staleness_cycle.py', *sys.argv[1:]])}` on {machine()}: "
        f"{args.rows:,} rows (`hash` backend, 4 shards), {args.change:.1%} of rows edited before each check, "
        f"threshold {args.threshold:.0%}.",
        "",
        "| check | stale rows | stale fraction | action | seconds |",
        "|---:|---:|---:|---|---:|",
        *[f"| {s} | {n} | {f:.2%} | {'refresh + promote' if r else '-'} | {sec:.1f} |" for s, n, f, r, _, sec in table],
        "",
        f"Median check without a refresh (status: dry-run scan + plan on Ray, verify of the active version): "
        f"{statistics.median(checks):.1f} s; with a refresh and gated promotion: "
        f"{statistics.median(cycles) if cycles else float('nan'):.1f} s.",
        "",
        "![staleness over a refresh cycle](img/staleness-cycle.png)",
        MARK_END,
    ]
    print("\n".join(lines))
    if args.write:
        write_section(MARK_BEGIN, MARK_END, "\n".join(lines))


if __name__ == "__main__":
    main()
