"""Batches over HTTP (issue 28, item 5): queries/s with 1 query per request vs 32 per request, side by side.

    .venv/bin/python bench/batches.py [--docs 5000] [--queries 640] [--rounds 3] [--write]

Builds a collection of --docs stdlib docstrings with MiniLM (bf16 where native, as the quickstart), serves it
with `embray.serving` on a local Ray (one replica, default proxy), and sends the same --queries text queries
(docstring summary lines) from one client, in turns: one per request (`{"text": ...}`), then 32 per request
(`{"queries": [...]}`); --rounds turns each, so machine noise falls on both alike. Prints queries/s (median
over the rounds) and the ratio; --write puts the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import machine, write_section  # noqa: E402 - the sibling benchmark's helpers

MARK_BEGIN = "<!-- bench/batches.py begin -->"
MARK_END = "<!-- bench/batches.py end -->"
BATCH = 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import ray
    import requests
    from ray import serve

    from embray import Collection
    from embray.config import parse_config
    from embray.demo import write_demo
    from embray.serving import application

    tmp = Path(tempfile.mkdtemp(prefix="embray-batches-"))
    write_demo(tmp / "demo", docs=args.docs, files=4)
    cfg = parse_config(
        {
            "collection": "docs",
            "source": {"uri": str(tmp / "demo" / "corpus")},
            "store": {"uri": str(tmp / "store")},
            "model": {"backend": "sentence-transformers", "name": "all-MiniLM-L6-v2", "precision": "bf16"},
            "embed": {"actors": 1, "num_cpus": 1, "keep_warm_s": 0},
            "serve": {"port": args.port, "num_cpus": 1, "max_batch": BATCH},
        }
    )
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    col = Collection(cfg)
    col.backfill()
    import pyarrow.parquet as pq

    texts = [
        t.split("\n", 1)[0][:200]
        for f in sorted((tmp / "demo" / "corpus").glob("*.parquet"))
        for t in pq.read_table(f, columns=["text"]).column(0).to_pylist()
    ]
    queries = [t for t in texts if len(t.split()) >= 3][: args.queries]
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(application(cfg), name="embray", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}/v1/collections/docs/search"
    session = requests.Session()
    assert session.post(url, json={"text": queries[0]}, timeout=60).status_code == 200  # (warm)

    def one_by_one() -> float:
        t = time.perf_counter()
        for q in queries:
            assert session.post(url, json={"text": q, "k": 10}, timeout=60).status_code == 200
        return len(queries) / (time.perf_counter() - t)

    def batched() -> float:
        t = time.perf_counter()
        for i in range(0, len(queries), BATCH):
            body = {"queries": [{"text": q} for q in queries[i : i + BATCH]], "k": 10}
            assert session.post(url, json=body, timeout=60).status_code == 200
        return len(queries) / (time.perf_counter() - t)

    rates: dict[str, list[float]] = {"1": [], str(BATCH): []}
    for _ in range(args.rounds):
        rates["1"].append(one_by_one())
        rates[str(BATCH)].append(batched())
    serve.shutdown()
    one, many = statistics.median(rates["1"]), statistics.median(rates[str(BATCH)])
    lines = [
        MARK_BEGIN,
        "## Batches over HTTP: 1 vs 32 queries per request (issue 28)",
        "",
        f"`.venv/bin/python bench/batches.py --docs {args.docs} --queries {len(queries)} --rounds {args.rounds}` "
        f"on {machine()}.",
        "",
        f"One client, {len(queries)} text queries (docstring summary lines), MiniLM (bf16), k=10, one Serve replica "
        f"(1 CPU), default proxy; turns alternate, median of {args.rounds}.",
        "",
        "| queries per request | queries/s (median) | each round |",
        "| --- | --- | --- |",
        f"| 1 | {one:.0f} | {', '.join(f'{r:.0f}' for r in rates['1'])} |",
        f"| {BATCH} | {many:.0f} | {', '.join(f'{r:.0f}' for r in rates[str(BATCH)])} |",
        "",
        f"{BATCH} per request: {many / one:.1f}x the queries/s of one per request (the texts of a batch are "
        "embedded in one call, and one HTTP round trip carries them all).",
        MARK_END,
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(MARK_BEGIN, MARK_END, text)


if __name__ == "__main__":
    main()
