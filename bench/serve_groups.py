"""Sharded serving: one version served with serve.shard_groups G = 1, 2 and 4, side by side in one run.

    .venv/bin/python bench/serve_groups.py [--docs 1000000] [--model hash|minilm] [--groups 1,2,4]
                                           [--requests 400] [--rounds 2] [--write]

Builds (once, cached under --workdir) a collection of --docs documents (standard-library docstrings,
numbered to make each distinct; 8 shards), then for each G starts a Ray session of its own (a child process,
HAProxy ingress: RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1) with the Serve app deployed
with shard_groups G (one replica per group, one ingress replica) and measures
  load        seconds from `serve.run` to the first ready answer (every group loaded and warm)
  memory      per replica: RSS after the queries, and the index bytes it maps (its shards' files)
  queries     text and vector queries over HTTP at 1 and 8 clients: p50 / p99 ms and requests/s
The G values take turns for --rounds rounds (--requests / --rounds requests per cell each), so load from
elsewhere on the machine falls on all alike. The fan-out cost is the p50 of G = 2 minus G = 1 (same data,
same ingress; G = 1 searches in the ingress itself). --write puts the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import ROOT, machine, write_section  # noqa: E402 - the sibling benchmark's helpers

from serve import PROXY_ENV, pct, run_clients  # noqa: E402

SHARDS = 8


def marks(model: str, docs: int = 1_000_000) -> tuple[str, str]:
    """The docs/benchmarks.md section of one (model, size): 1M hash rows keep the plain markers."""
    tag = "bench/serve_groups.py" + ("" if model == "hash" else f" --model {model}")
    tag += "" if docs == 1_000_000 else f" --docs {docs}"
    return f"<!-- {tag} begin -->", f"<!-- {tag} end -->"


def config(args: argparse.Namespace, groups: int):
    from embray.config import parse_config

    work = Path(args.workdir) / f"{args.model}-{args.docs}"
    model = {"minilm": {"backend": "sentence-transformers"}, "hash": {"backend": "hash", "name": "w", "dims": 384}}
    return work, parse_config(
        {
            "collection": "bench",
            "source": {"uri": str(work / "corpus")},
            "store": {"uri": str(work / "store")},
            "model": model[args.model],
            "index": {"shards": SHARDS},
            "embed": {"batch_size": 1024, "actors": 1, "num_cpus": 1},
            "serve": {
                "port": args.port,
                "poll_s": 3600,
                "max_ongoing_requests": 16,
                "shard_groups": groups,
                "num_cpus": 0.5,
                "group_num_cpus": 0.25,
            },
        },
        base_dir=work,
    )


def build(args: argparse.Namespace) -> None:
    """The corpus and its first version, once."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from embray import Collection
    from embray.demo import write_demo

    work, cfg = config(args, 1)
    if list((work / "store").glob("*/versions/*/manifest.json")):
        return  # built (a failed build leaves no manifest)
    if not (work / "demo").exists():
        write_demo(work / "demo", docs=10_000, files=1)
    docs = pq.read_table(work / "demo" / "corpus").column("text").to_pylist()
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    ids = [f"d{k:07d}" for k in range(args.docs)]
    texts = [f"{docs[k % len(docs)]} [{k}]" for k in range(args.docs)]
    for f in range(16):
        pq.write_table(pa.table({"id": ids[f::16], "text": texts[f::16]}), work / "corpus" / f"p{f:02d}.parquet")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    Collection(cfg).backfill()
    print(f"built the index in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--model", choices=["hash", "minilm"], default="hash")
    ap.add_argument("--groups", default="1,2,4")
    ap.add_argument("--requests", type=int, default=400, help="requests per (G, query, clients) cell")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/embray-bench-groups")
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)  # internal: one session with G groups ...
    ap.add_argument("--out", help=argparse.SUPPRESS)  # ... writing its raw figures here
    args = ap.parse_args()
    if args.child:
        session(args)
        return
    import tempfile

    build(args)
    gs = [int(g) for g in args.groups.split(",")]
    per = max(8, args.requests // args.rounds)
    raw: dict[int, dict] = {g: {} for g in gs}
    info: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for g in gs:
                out = Path(tmp) / f"{g}-{r}.json"
                cmd = [sys.executable, __file__, "--child", str(g), "--out", str(out), "--requests", str(per)]
                cmd += ["--docs", str(args.docs), "--model", args.model, "--workdir", args.workdir]
                cmd += ["--port", str(args.port)]
                print(f"round {r + 1}/{args.rounds}: G = {g}", file=sys.stderr, flush=True)
                subprocess.run(cmd, check=True, env={**os.environ, **PROXY_ENV["haproxy"]})
                got = json.loads(out.read_text())
                info.setdefault(g, []).append(got.pop("info"))
                for key, (lat, wall) in got.items():
                    acc = raw[g].setdefault(key, ([], 0.0))
                    raw[g][key] = (acc[0] + lat, acc[1] + wall)

    def stats(g: int, key: str) -> tuple[float, float, float]:
        lat, wall = raw[g][key]
        return statistics.median(lat), pct(lat, 99), len(lat) / wall

    first = info[gs[0]][0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    lines = [
        marks(args.model, args.docs)[0],
        "## Sharded serving: shard groups G = "
        + ", ".join(map(str, gs))
        + ("" if args.model == "hash" else f" (`--model {args.model}`)"),
        "",
        f"Command: `.venv/bin/python bench/serve_groups.py --docs {args.docs} --model {args.model} "
        f"--groups {args.groups} --requests {args.requests} --rounds {args.rounds}` "
        f"(commit {commit.stdout.strip() or '?'})",
        "",
        f"Machine: {machine()}.",
        "",
        f"Index: {first['rows']:,} documents ({first['model']}, {first['dims']} dims, {first['shards']} USearch "
        "shards, f16, HNSW). HAProxy ingress; one ingress replica (EmbrayServer: with G > 1 only the encoder) "
        "and one replica per shard group; all on this one 2-CPU machine, so with G > 1 the replicas share its "
        f"two cores. k = 10; {per * args.rounds} requests per cell after a warm-up; the G values took turns, "
        f"{args.rounds} rounds. Load: `serve.run` to the first ready answer (median of the rounds). Memory per "
        "replica: RSS after the queries (max over the rounds), and the bytes of index files it maps.",
        "",
        "| G | load s | ingress RSS MB | group replica RSS MB (each) | index MB mapped per group replica |",
        "| ---: | ---: | ---: | --- | ---: |",
    ]
    for g in gs:
        runs = info[g]
        load = statistics.median(i["load_s"] for i in runs)
        ingress = max(i["rss_mb"]["ingress"] for i in runs)
        group_rss = [max(i["rss_mb"]["groups"][j] for i in runs) for j in range(len(runs[0]["rss_mb"]["groups"]))]
        mapped = runs[0]["mapped_mb"]
        lines.append(
            f"| {g} | {load:.1f} | {ingress:.0f} | {', '.join(f'{x:.0f}' for x in group_rss) or '(in the ingress)'} "
            f"| {mapped:.0f} |"
        )
    lines += [
        "",
        "| query | clients | G | p50 ms | p99 ms | req/s | p50 vs G = 1 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for query in ("text", "vector"):
        for clients in (1, 8):
            base = stats(gs[0], f"{query}/{clients}")[0]
            for g in gs:
                s = stats(g, f"{query}/{clients}")
                lines.append(
                    f"| {query} | {clients} | {g} | {s[0]:.2f} | {s[1]:.2f} | {s[2]:.0f} | {s[0] - base:+.2f} |"
                )
    lines.append(marks(args.model, args.docs)[1])
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(*marks(args.model, args.docs), text)


def _replica_pids() -> dict[str, list[int]]:
    """Serve replica processes by deployment, from their process titles (ray::ServeReplica:<app>:<deployment>)."""
    pids: dict[str, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, ValueError):
            continue
        if title.startswith("ray::ServeReplica:"):
            pids.setdefault(title.split(":")[-1].strip(), []).append(int(proc.name))
    return pids


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def session(args: argparse.Namespace) -> None:
    """One Ray session serving with G = ``args.child`` groups: raw figures into ``args.out``."""
    import numpy as np
    import pyarrow.parquet as pq
    import ray
    import requests
    import torch
    from ray import serve

    from embray import Collection
    from embray.search import group_shards
    from embray.serving import application

    G = args.child
    work, cfg = config(args, G)
    torch.set_num_threads(1)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    docs = pq.read_table(work / "demo" / "corpus").column("text").to_pylist()
    rng = np.random.default_rng(0)
    queries = [" ".join(docs[i].split()[:12]) for i in rng.choice(len(docs), 300, replace=False)]
    vi = Collection(cfg).index()
    qvecs = vi.embedder.embed_queries(queries)
    fp, m = vi.fingerprint, vi.manifest
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    base = f"http://127.0.0.1:{args.port}"
    url = f"{base}/v1/collections/bench/search"
    t = time.perf_counter()
    serve.run(application(cfg), name="embray", route_prefix="/")
    while True:
        try:
            if requests.post(url, json={"text": "warm", "k": 1}, timeout=30).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.1)
    load_s = time.perf_counter() - t
    sessions: dict[int, requests.Session] = {}

    def client() -> requests.Session:
        import threading

        return sessions.setdefault(threading.get_ident(), requests.Session())

    def http_text(q: int) -> None:
        r = client().post(url, json={"text": queries[q], "k": 10}, timeout=60)
        assert r.status_code == 200, r.text

    def http_vector(q: int) -> None:
        r = client().post(url, json={"vector": qvecs[q].tolist(), "fingerprint": fp, "k": 10}, timeout=60)
        assert r.status_code == 200, r.text

    idx = list(range(len(queries)))
    for fn in (http_text, http_vector):
        run_clients(fn, idx, 2, 40)
    out: dict = {}
    for name, fn in (("text", http_text), ("vector", http_vector)):
        for clients in (1, 8):
            lat, wall = run_clients(fn, idx, clients, args.requests)
            out[f"{name}/{clients}"] = (lat, wall)
            print(
                f"[G={G}] {name} x{clients}: p50 {statistics.median(lat):.2f} ms, p99 {pct(lat, 99):.2f} ms, "
                f"{len(lat) / wall:.0f} req/s",
                file=sys.stderr,
                flush=True,
            )
    pids = _replica_pids()
    mine = group_shards(len(m.shards), 0, G)
    mapped = sum(s.index.bytes for s in m.shards if s.shard in mine and s.index) / 2**20
    out["info"] = {
        "rows": m.rows,
        "model": m.model.label,
        "dims": m.dims,
        "shards": len(m.shards),
        "load_s": load_s,
        "mapped_mb": mapped,
        "rss_mb": {
            "ingress": max(_rss_mb(p) for p in pids.get("EmbrayServer", [0]) if p),
            "groups": [_rss_mb(pids[f"EmbrayShardGroup{g}"][0]) for g in range(G)] if G > 1 else [],
        },
    }
    serve.shutdown()
    ray.shutdown()
    Path(args.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
