"""What the monitoring commands cost on a real collection: status, eval (recall@10) and audit.

    .venv/bin/python bench/monitor_costs.py [--workdir /tmp/embray-bench-serve/minilm-100000] [--rounds 3] [--write]

Uses the 100,000-document MiniLM collection that bench/serve.py builds and caches (run that first;
building it takes about 30 minutes on 2 CPUs). Each round, in one process and one Ray session:
  status          dry-run staleness (Ray scan + plan of every source row) + verify of `active` (sha256 of every file)
  status --no-verify
  eval            ANN recall@10 vs exact search, --sample queries (no model needed)
  audit           re-embed --audit-sample stored rows with MiniLM and compare (cosine)
Prints medians; --write puts the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import machine, write_section  # noqa: E402 - the sibling benchmark's helpers

MARK_BEGIN = "<!-- bench/monitor_costs.py begin -->"
MARK_END = "<!-- bench/monitor_costs.py end -->"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/embray-bench-serve/minilm-100000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sample", type=int, default=200)
    ap.add_argument("--audit-sample", type=int, default=200)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    if not (work / "store").exists():
        sys.exit(f"{work} has no collection: run `.venv/bin/python bench/serve.py --docs 100000 --model minilm` first")

    import ray

    from embray import Collection
    from embray.config import parse_config
    from embray.quality.retrieval import evaluate

    col = Collection(
        parse_config(
            {
                "collection": "bench",
                "source": {"uri": str(work / "corpus")},
                "store": {"uri": str(work / "store")},
                "model": {"backend": "sentence-transformers"},
                "index": {"shards": 4},
            },
            base_dir=work,
        )
    )
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    times: dict[str, list[float]] = {"status": [], "status --no-verify": [], "eval": [], "audit": []}
    last: dict[str, dict] = {}
    active = col.status(verify=False, staleness=False).active.id
    for r in range(args.rounds):
        steps = [
            ("status", col.status, (), {}),
            ("status --no-verify", col.status, (), {"verify": False}),
            ("eval", evaluate, (col.context, active), {"sample": args.sample, "record": False}),
            ("audit", col.audit, (active,), {"sample": args.audit_sample, "seed": r}),
        ]
        for name, fn, a, kw in steps:
            t = time.perf_counter()
            last[name] = fn(*a, **kw).to_dict()
            times[name].append(time.perf_counter() - t)
            print(f"round {r} {name}: {times[name][-1]:.1f}s", flush=True)
    st, ev, au = last["status"], last["eval"], last["audit"]
    rows = st["active"]["rows"]
    lines = [
        MARK_BEGIN,
        "## Monitoring costs (status, eval, audit)",
        "",
        f"`.venv/bin/python bench/monitor_costs.py {' '.join(sys.argv[1:])}` on {machine()}: the "
        f"{rows:,}-document MiniLM collection of bench/serve.py (4 shards, f16 HNSW), source unchanged; "
        f"median of {args.rounds} rounds.",
        "",
        "| command | what it does | median s | result |",
        "|---|---|---:|---|",
        f"| `status` | dry-run staleness of {st['staleness']['source_rows']:,} source rows (Ray scan + plan) "
        f"+ verify of `active` | {statistics.median(times['status']):.1f} | ok={st['ok']}, "
        f"stale {st['staleness']['stale']} |",
        f"| `status --no-verify` | staleness only | {statistics.median(times['status --no-verify']):.1f} | |",
        f"| `eval` | ANN recall@10 vs exact, {ev['recall_queries']} queries | "
        f"{statistics.median(times['eval']):.1f} | recall@10 = {ev['recall_at_10']} |",
        f"| `audit` | re-embed {au['compared']} stored rows with MiniLM (incl. model load), cosine | "
        f"{statistics.median(times['audit']):.1f} | min cosine {au['min_cosine']}, drifted {au['drifted']} |",
        MARK_END,
    ]
    print("\n".join(lines))
    if args.write:
        write_section(MARK_BEGIN, MARK_END, "\n".join(lines))


if __name__ == "__main__":
    main()
