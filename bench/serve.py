"""Query latency: the Serve endpoint over HTTP vs direct in-process search on the same shards, one run.

    .venv/bin/python bench/serve.py [--docs 100000] [--model minilm|hash] [--requests 400] [--write]

Builds (once, cached under --workdir) a collection of --docs documents (Python standard library
docstrings, numbered to make each distinct) with embray backfill, starts `embray.serving` on the
local Ray, then for text queries and vector queries, at 1 and 8 concurrent clients, measures
  http        POST /v1/collections/{name}/search through the Serve proxy (requests.Session per client)
  in-process  VersionIndex.search_text / search_vectors in this process (a thread per client)
p50/p99 latency and requests/s. --write puts the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import ROOT, machine, write_section  # noqa: E402 - the sibling benchmark's helpers

MARK_BEGIN = "<!-- bench/serve.py begin -->"
MARK_END = "<!-- bench/serve.py end -->"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def run_clients(call, queries: list, clients: int, total: int) -> tuple[list[float], float]:
    """Run ``total`` calls spread over ``clients`` threads; returns (latencies ms, wall seconds)."""
    lat: list[float] = []
    lock = threading.Lock()
    per = total // clients

    def worker(c: int) -> None:
        mine = []
        for i in range(per):
            q = queries[(c * per + i) % len(queries)]
            t = time.perf_counter()
            call(q)
            mine.append((time.perf_counter() - t) * 1000)
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--model", choices=["minilm", "hash"], default="minilm")
    ap.add_argument("--requests", type=int, default=400, help="requests per (mode, clients) cell")
    ap.add_argument("--workdir", default="/tmp/embray-bench-serve")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import requests
    from ray import serve

    from embray.config import parse_config
    from embray.demo import write_demo
    from embray.flows import backfill
    from embray.search import open_version
    from embray.serving import application

    work = Path(args.workdir) / f"{args.model}-{args.docs}"
    model = (
        {"backend": "sentence-transformers"}
        if args.model == "minilm"
        else {"backend": "hash", "name": "w", "dims": 384}
    )
    cfg = parse_config(
        {
            "collection": "bench",
            "source": {"uri": str(work / "corpus")},
            "store": {"uri": str(work / "store")},
            "model": model,
            "index": {"shards": 4},
            "embed": {"batch_size": 512, "actors": 1, "num_cpus": 1},
            "serve": {"port": args.port, "num_cpus": 1, "poll_s": 3600, "max_ongoing_requests": 16},
        },
        base_dir=work,
    )
    if not (work / "demo").exists():
        write_demo(work / "demo", docs=10_000, files=1)
    docs = pq.read_table(work / "demo" / "corpus").column("text").to_pylist()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    if not (work / "corpus").exists():
        (work / "corpus").mkdir(parents=True)
        ids = [f"d{k:07d}" for k in range(args.docs)]
        texts = [f"{docs[k % len(docs)]} [{k}]" for k in range(args.docs)]
        for f in range(16):
            pq.write_table(pa.table({"id": ids[f::16], "text": texts[f::16]}), work / "corpus" / f"p{f:02d}.parquet")
        t = time.perf_counter()
        backfill(cfg)
        print(f"built the index in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)

    import torch

    torch.set_num_threads(1)  # as in the Serve replica, which Ray gives 1 CPU (OMP_NUM_THREADS=1)
    rng = np.random.default_rng(0)
    queries = [" ".join(docs[i].split()[:12]) for i in rng.choice(len(docs), 300, replace=False)]
    vi = open_version(cfg)
    qvecs = vi.embedder.embed_queries(queries)
    fp = vi.fingerprint

    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(application(cfg), name="embray", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}/v1/collections/bench/search"
    sessions = threading.local()

    def http_text(q: int) -> None:
        s = getattr(sessions, "s", None) or requests.Session()
        sessions.s = s
        r = s.post(url, json={"text": queries[q], "k": 10}, timeout=60)
        assert r.status_code == 200, r.text

    def http_vector(q: int) -> None:
        s = getattr(sessions, "s", None) or requests.Session()
        sessions.s = s
        r = s.post(url, json={"vector": qvecs[q].tolist(), "fingerprint": fp, "k": 10}, timeout=60)
        assert r.status_code == 200, r.text

    def local_text(q: int) -> None:
        vi.search_text([queries[q]], 10)

    def local_vector(q: int) -> None:
        vi.search_vectors(qvecs[q : q + 1], 10)

    idx = list(range(len(queries)))
    for fn in (http_text, http_vector, local_text, local_vector):  # warm-up
        run_clients(fn, idx, 2, 40)
    rows = []
    for mode, http_fn, local_fn in (("text", http_text, local_text), ("vector", http_vector, local_vector)):
        for clients in (1, 8):
            cell = {}
            for where, fn in (("http", http_fn), ("in-process", local_fn)):
                lat, wall = run_clients(fn, idx, clients, args.requests)
                cell[where] = (statistics.median(lat), pct(lat, 99), len(lat) / wall)
                print(
                    f"{mode} x{clients} {where}: p50 {cell[where][0]:.2f} ms, p99 {cell[where][1]:.2f} ms, "
                    f"{cell[where][2]:.0f} req/s",
                    file=sys.stderr,
                    flush=True,
                )
            rows.append((mode, clients, cell))
    serve.shutdown()
    ray.shutdown()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    lines = [
        MARK_BEGIN,
        "## Query latency: Serve over HTTP vs in-process",
        "",
        f"Command: `.venv/bin/python bench/serve.py --docs {args.docs} --model {args.model} "
        f"--requests {args.requests}` (commit {commit.stdout.strip() or '?'})",
        "",
        f"Machine: {machine()}.",
        "",
        f"Index: {vi.manifest.rows} documents ({vi.manifest.model.label}, {vi.manifest.dims} dims, "
        f"{len(vi.manifest.shards)} USearch shards, f16, HNSW). One Serve replica (1 CPU); the in-process column "
        "searches the same shards from the benchmark process, with torch on 1 thread like the replica. "
        "k = 10; queries are the first 12 words of 300 random "
        f"docstrings; {args.requests} requests per cell after a warm-up.",
        "",
        "| query | clients | HTTP p50 ms | HTTP p99 ms | HTTP req/s | in-process p50 ms | in-process p99 ms "
        "| in-process req/s | HTTP overhead at p50 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, clients, cell in rows:
        h, i = cell["http"], cell["in-process"]
        lines.append(
            f"| {mode} | {clients} | {h[0]:.2f} | {h[1]:.2f} | {h[2]:.0f} | {i[0]:.2f} | {i[1]:.2f} | {i[2]:.0f} "
            f"| {h[0] - i[0]:.2f} |"
        )
    lines.append(MARK_END)
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(MARK_BEGIN, MARK_END, text)


if __name__ == "__main__":
    main()
