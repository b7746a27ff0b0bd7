"""Query latency: the Serve endpoint over HTTP vs direct in-process search on the same shards, one run.

    .venv/bin/python bench/serve.py [--docs 100000] [--model minilm|minilm-onnx|hash] [--requests 400]
                                    [--proxy default,haproxy] [--rounds 2] [--write]

Builds (once, cached under --workdir) a collection of --docs documents (Python standard library
docstrings, numbered to make each distinct) with embray backfill, starts `embray.serving` on a
local Ray, then for text queries and vector queries, at 1 and 8 concurrent clients, measures
  http        POST /v1/collections/{name}/search through the HTTP ingress (requests.Session per client)
  in-process  VersionIndex.search_text / search_vectors in this process (a thread per client)
p50/p99 latency and requests/s, and GET /healthz (1 client). Each --proxy mode is its own Ray session
(a child process: Serve reads these settings when Ray starts):
  default     Serve's Python proxy actor in front of the replica
  haproxy     RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1: HAProxy (bundled with
              ray[serve] on Linux) forwards straight to the replica's own HTTP server
The modes take turns for --rounds rounds of --requests/--rounds requests per cell, so load from
elsewhere on the machine falls on both alike. --write puts the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
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


def marks(model: str) -> tuple[str, str]:
    """The docs/benchmarks.md section of one model's table (the MiniLM one keeps its original markers)."""
    tag = "bench/serve.py" if model == "minilm" else f"bench/serve.py --model {model}"
    return f"<!-- {tag} begin -->", f"<!-- {tag} end -->"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


PROXY_ENV = {
    "default": {},
    "haproxy": {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # a benchmark needs no 30 s drain for load balancers at shutdown
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    },
}


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
    ap.add_argument(
        "--model",
        choices=["minilm", "minilm-onnx", "hash"],
        default="minilm",
        help="minilm: sentence-transformers; minilm-onnx: the same weights through the onnx backend (int8)",
    )
    ap.add_argument("--requests", type=int, default=400, help="requests per (mode, clients) cell")
    ap.add_argument("--proxy", default="default,haproxy", help="HTTP ingress modes to compare: default, haproxy")
    ap.add_argument("--rounds", type=int, default=2, help="turns each --proxy mode takes")
    ap.add_argument("--workdir", default="/tmp/embray-bench-serve")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one session in this proxy mode ...
    ap.add_argument("--out", help=argparse.SUPPRESS)  # ... writing its raw latencies here
    args = ap.parse_args()
    if args.child:
        session(args)
        return

    import tempfile

    modes = [m.strip() for m in args.proxy.split(",") if m.strip()]
    unknown = set(modes) - set(PROXY_ENV)
    if not modes or unknown:
        ap.error(f"--proxy takes a comma list of {sorted(PROXY_ENV)}")
    per = max(8, args.requests // args.rounds)
    raw: dict[str, dict] = {m: {} for m in modes}
    info: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in modes:
                out = Path(tmp) / f"{mode}-{r}.json"
                cmd = [sys.executable, __file__, "--child", mode, "--out", str(out), "--requests", str(per)]
                cmd += ["--docs", str(args.docs), "--model", args.model, "--workdir", args.workdir]
                cmd += ["--port", str(args.port)]
                print(f"round {r + 1}/{args.rounds}: {mode}", file=sys.stderr, flush=True)
                subprocess.run(cmd, check=True, env={**os.environ, **PROXY_ENV[mode]})
                got = json.loads(out.read_text())
                info = got.pop("info")
                for key, (lat, wall) in got.items():
                    acc = raw[mode].setdefault(key, ([], 0.0))
                    raw[mode][key] = (acc[0] + lat, acc[1] + wall)

    def stats(key_mode: str, key: str) -> tuple[float, float, float]:
        lat, wall = raw[key_mode][key]
        return statistics.median(lat), pct(lat, 99), len(lat) / wall

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    lines = [
        marks(args.model)[0],
        "## Query latency: Serve over HTTP vs in-process"
        + ("" if args.model == "minilm" else f" (`--model {args.model}`)"),
        "",
        f"Command: `.venv/bin/python bench/serve.py --docs {args.docs} --model {args.model} "
        f"--requests {args.requests} --proxy {','.join(modes)} --rounds {args.rounds}` "
        f"(commit {commit.stdout.strip() or '?'})",
        "",
        f"Machine: {machine()}.",
        "",
        f"Index: {info['rows']} documents ({info['model']}, {info['dims']} dims, {info['shards']} USearch shards, "
        "f16, HNSW). One Serve replica (1 CPU); the in-process column searches the same shards from the "
        "benchmark process, with torch on 1 thread like the replica. k = 10; queries are the first 12 words of "
        f"300 random docstrings; {per * args.rounds} requests per cell after a warm-up. Proxy `default` is "
        "Serve's Python proxy actor; `haproxy` is `RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1` "
        "(HAProxy forwards straight to the replica's HTTP server). Each mode is its own Ray session; the "
        f"modes took turns, {args.rounds} rounds.",
        "",
        "| query | proxy | clients | HTTP p50 ms | HTTP p99 ms | HTTP req/s | in-process p50 ms "
        "| in-process p99 ms | in-process req/s | HTTP overhead at p50 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in modes:
        h = stats(mode, "healthz/1/http")
        lines.append(f"| GET /healthz | {mode} | 1 | {h[0]:.2f} | {h[1]:.2f} | {h[2]:.0f} | | | | |")
    for query in ("text", "vector"):
        for clients in (1, 8):
            for mode in modes:
                h, i = stats(mode, f"{query}/{clients}/http"), stats(mode, f"{query}/{clients}/in-process")
                lines.append(
                    f"| {query} | {mode} | {clients} | {h[0]:.2f} | {h[1]:.2f} | {h[2]:.0f} | {i[0]:.2f} "
                    f"| {i[1]:.2f} | {i[2]:.0f} | {h[0] - i[0]:.2f} |"
                )
    lines.append(marks(args.model)[1])
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(*marks(args.model), text)


def session(args: argparse.Namespace) -> None:
    """One Ray session in proxy mode ``args.child``: raw latencies of every cell into ``args.out``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import requests
    from ray import serve

    from embray import Collection
    from embray.config import parse_config
    from embray.demo import write_demo
    from embray.serving import application

    work = Path(args.workdir) / f"{args.model}-{args.docs}"
    model = {
        "minilm": {"backend": "sentence-transformers"},
        "minilm-onnx": {"backend": "onnx"},
        "hash": {"backend": "hash", "name": "w", "dims": 384},
    }[args.model]
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
        Collection(cfg).backfill()
        print(f"built the index in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)

    import torch

    torch.set_num_threads(1)  # as in the Serve replica, which Ray gives 1 CPU (OMP_NUM_THREADS=1)
    rng = np.random.default_rng(0)
    queries = [" ".join(docs[i].split()[:12]) for i in rng.choice(len(docs), 300, replace=False)]
    vi = Collection(cfg).index()
    qvecs = vi.embedder.embed_queries(queries)
    fp = vi.fingerprint

    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(application(cfg), name="embray", route_prefix="/")
    base = f"http://127.0.0.1:{args.port}"
    url = f"{base}/v1/collections/bench/search"
    sessions = threading.local()

    def client() -> requests.Session:
        s = getattr(sessions, "s", None) or requests.Session()
        sessions.s = s
        return s

    def http_healthz(q: int) -> None:
        r = client().get(f"{base}/healthz", timeout=60)
        assert r.status_code == 200, r.text

    def http_text(q: int) -> None:
        r = client().post(url, json={"text": queries[q], "k": 10}, timeout=60)
        assert r.status_code == 200, r.text

    def http_vector(q: int) -> None:
        r = client().post(url, json={"vector": qvecs[q].tolist(), "fingerprint": fp, "k": 10}, timeout=60)
        assert r.status_code == 200, r.text

    def local_text(q: int) -> None:
        vi.search_text([queries[q]], 10)

    def local_vector(q: int) -> None:
        vi.search_vectors(qvecs[q : q + 1], 10)

    idx = list(range(len(queries)))
    for fn in (http_healthz, http_text, http_vector, local_text, local_vector):  # warm-up
        run_clients(fn, idx, 2, 40)
    out: dict = {
        "info": {
            "rows": vi.manifest.rows,
            "model": vi.manifest.model.label,
            "dims": vi.manifest.dims,
            "shards": len(vi.manifest.shards),
        }
    }
    lat, wall = run_clients(http_healthz, idx, 1, args.requests)
    out["healthz/1/http"] = (lat, wall)
    print(f"[{args.child}] healthz x1 http: p50 {statistics.median(lat):.2f} ms", file=sys.stderr, flush=True)
    for mode, http_fn, local_fn in (("text", http_text, local_text), ("vector", http_vector, local_vector)):
        for clients in (1, 8):
            for where, fn in (("http", http_fn), ("in-process", local_fn)):
                lat, wall = run_clients(fn, idx, clients, args.requests)
                out[f"{mode}/{clients}/{where}"] = (lat, wall)
                print(
                    f"[{args.child}] {mode} x{clients} {where}: p50 {statistics.median(lat):.2f} ms, "
                    f"p99 {pct(lat, 99):.2f} ms, {len(lat) / wall:.0f} req/s",
                    file=sys.stderr,
                    flush=True,
                )
    serve.shutdown()
    ray.shutdown()
    Path(args.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
