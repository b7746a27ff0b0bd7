"""Delta segments: what a 1% refresh costs with them and without, and what they cost search, in one run.

    .venv/bin/python bench/segments.py [--model hash|minilm] [--from DIR] [--segments 1,4,8]
                                       [--queries 300] [--write]

Starts from a built collection (--from: a corpus/ and store/ pair, e.g. the one bench/serve_groups.py
builds: 1,000,000 rows, `hash` backend, 384 dims, 8 shards, or with --model minilm the MiniLM one of
`bench/serve_groups.py --model minilm --docs 20000`; copied, so the original stays as it is). Ray is warmed up
first (a backfill and a refresh of a 2,000-row scratch collection with the same model: worker processes
started, imports done, MiniLM loaded in its warm actor), so the figures leave out what a cold Ray job pays
once. Then it measures
  refresh, delta       a 1% random change (0.4% inserted, 0.4% updated, 0.2% deleted) refreshed with the
                       default index.max_delta_fraction 0.1: each shard keeps its index, adds a segment
  refresh, in place    the same change with segments off (max_delta_fraction 0): each shard's HNSW graph is
                       loaded, updated, and written whole (what every refresh did before)
  one file, delta      a 1% change confined to one source file (of 16)
each as build seconds / the backfill's build seconds (both without the model load) and bytes written / the
changed rows' own vector bytes (rows x dims x 4). Then a chain of 1% refreshes piles up 1, 4 and 8 segments
per shard: search p50 / p99 (vector queries, k = 10, in process) and recall@10 against exact search at each,
and the seconds to open the version for search (a shard with segments is loaded and its segments merged into
its graph), next to whole shards (the in-place refresh above); then `embray compact` of the 8-segment version
(its time, and search on its child), and the compaction a refresh past index.max_segments does.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import ROOT, machine, write_section  # noqa: E402 - the sibling benchmark's helpers

from serve import pct  # noqa: E402

MODELS = {"minilm": {"backend": "sentence-transformers"}, "hash": {"backend": "hash", "name": "w", "dims": 384}}


def marks(model: str) -> tuple[str, str]:
    """The docs/benchmarks.md section of one model (the hash one keeps the plain markers)."""
    tag = "bench/segments.py" + ("" if model == "hash" else f" --model {model}")
    return f"<!-- {tag} begin -->", f"<!-- {tag} end -->"


def read_corpus(root: Path) -> dict[Path, tuple[list, list]]:
    import pyarrow.parquet as pq

    out = {}
    for f in sorted(root.glob("*.parquet")):
        t = pq.read_table(f)
        out[f] = (t.column("id").to_pylist(), t.column("text").to_pylist())
    return out


def write_file(path: Path, ids: list, texts: list) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ids, "text": texts}), path)


def mutate(files: dict, fraction: float, rng: random.Random, tag: str, only: Path | None = None) -> int:
    """Change ``fraction`` of all rows (40% inserted, 40% updated, 20% deleted) in place, spread over every
    file or confined to ``only``; rewrites the touched files. Returns the rows inserted or updated."""
    total = sum(len(ids) for ids, _ in files.values())
    n = round(total * fraction)
    targets = [only] if only else list(files)
    touched = set()
    for j in range(n):
        f = rng.choice(targets)
        ids, texts = files[f]
        kind = j % 5  # 0, 1: insert; 2, 3: update; 4: delete
        if kind < 2:
            ids.append(f"{tag}-{j}")
            texts.append(f"inserted row {tag} {j} {rng.random()}")
        else:
            i = rng.randrange(len(ids))
            if kind < 4:
                texts[i] = f"{texts[i]} updated {tag} {j}"
            else:
                ids.pop(i)
                texts.pop(i)
        touched.add(f)
    for f in touched:
        write_file(f, *files[f])
    return sum(1 for j in range(n) if j % 5 < 4)


# The hash model gets no warm actor: an idle one would hold one of the 2 CPUs between the timed refreshes (their
# 8,000 texts go to one plain task: earlier builds say it embeds them in well under embed.ONE_WORKER_S).
NO_WARM = {"hash": {"keep_warm_s": 0}}


def config(work: Path, model: str, embed: dict | None = None, **index):
    from embray.config import parse_config

    return parse_config(
        {
            "collection": "bench",
            "source": {"uri": str(work / "corpus")},
            "store": {"uri": str(work / "store")},
            "model": MODELS[model],
            "index": {"shards": 8, **index},
            "embed": {"batch_size": 1024, "actors": 1, "num_cpus": 1, **NO_WARM.get(model, {}), **(embed or {})},
        },
        base_dir=work,
    )


def written(m) -> int:
    return sum(f.bytes for f in m.files() if f.version in (None, m.version))


def warm_up(src: Path, work: Path, model: str) -> None:
    """A backfill and a refresh of a small scratch collection (2,000 rows of the corpus's first file) with the
    same model: Ray's workers start and import, and MiniLM is loaded in its warm actor (which the timed
    refreshes use: their 200 texts are a small job). The hash model gets no warm actor (:data:`NO_WARM`)."""
    import pyarrow.parquet as pq

    from embray import Collection

    shutil.rmtree(work, ignore_errors=True)
    (work / "corpus").mkdir(parents=True)
    first = sorted((src / "corpus").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(first).slice(0, 2000), work / "corpus" / "p.parquet")
    col = Collection(config(work, model))
    col.backfill()
    files = read_corpus(work / "corpus")
    mutate(files, 0.01, random.Random(2), "warm")
    col.refresh()
    shutil.rmtree(work)


def search_figures(col, version: str, q, k: int = 10) -> tuple[float, float, float, float]:
    """(p50 ms, p99 ms, recall@10 vs exact, seconds to open) of vector queries ``q`` on ``version``, one at a
    time."""
    t = time.perf_counter()
    vi = col.index(version)
    opened = time.perf_counter() - t
    lat = []
    for i in range(len(q)):
        t = time.perf_counter()
        vi.search_vectors(q[i : i + 1], k)
        lat.append((time.perf_counter() - t) * 1000)
    ann = vi.search_vectors(q, k)
    exact = vi.search_vectors(q, k, exact=True)
    recall = statistics.mean(len({h.id for h in a} & {h.id for h in e}) / k for a, e in zip(ann, exact, strict=True))
    return statistics.median(lat), pct(lat, 99), recall, opened


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="hash")
    ap.add_argument("--from", dest="src", help="default: /tmp/embray-bench-groups/hash-1000000 (minilm-20000)")
    ap.add_argument("--segments", default="1,4,8")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--workdir", default="/tmp/embray-bench-segments")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import numpy as np
    import ray

    from embray import Collection

    size = "1000000" if args.model == "hash" else "20000"
    src, work = Path(args.src or f"/tmp/embray-bench-groups/{args.model}-{size}"), Path(args.workdir)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    warm_up(src, work / "warm-up", args.model)
    runs: dict[str, Path] = {}
    for name in ("delta", "inplace", "onefile"):
        runs[name] = work / name
        shutil.rmtree(runs[name], ignore_errors=True)
        shutil.copytree(src / "corpus", runs[name] / "corpus")
        shutil.copytree(src / "store", runs[name] / "store")
    os.sync()  # the copies' writeback would otherwise compete with the first refresh for the disk
    base_col = Collection(config(runs["delta"], args.model))
    base = base_col.manifest()
    dims, rows = base.dims, base.rows
    backfill_s = base.stats["seconds"]
    rng = random.Random(0)
    out: dict[str, dict] = {}
    for name, index, only in (
        ("delta", {}, None),
        ("inplace", {"max_delta_fraction": 0}, None),
        ("onefile", {}, "p03.parquet"),
    ):
        files = read_corpus(runs[name] / "corpus")
        changed = mutate(files, 0.01, random.Random(1), name, runs[name] / "corpus" / only if only else None)
        col = Collection(config(runs[name], args.model, **index))
        t = time.perf_counter()
        res = col.refresh(promote=False)
        wall = time.perf_counter() - t
        m = res.manifest
        out[name] = {
            "build_s": m.stats["seconds"],
            "shard_s": m.stats["shard_seconds"],
            "wall_s": wall,
            "bytes": written(m),
            "changed": changed,
            "version": res.version,
            "delta": m.counts.get("shards_delta", 0),
        }
        print(f"{name}: {out[name]}", file=sys.stderr, flush=True)

    # Search with 0 (the in-place refresh: whole shards), 1, 4 and 8 segments per shard.
    qrng = np.random.default_rng(0)
    vi = base_col.index(base.version)
    picks = qrng.choice(len(vi.shards[0].keys), args.queries, replace=False)
    q = np.asarray(vi.shards[0].index.get(vi.shards[0].keys[picks], dtype=np.float32))
    q = q + qrng.normal(0, 0.05, q.shape).astype(np.float32)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    search = {0: search_figures(Collection(config(runs["inplace"], args.model)), out["inplace"]["version"], q)}
    want = sorted(int(s) for s in args.segments.split(","))
    col = Collection(config(runs["delta"], args.model))
    version, have = out["delta"]["version"], 1
    files = read_corpus(runs["delta"] / "corpus")
    chain_s = []
    while True:
        if have in want:
            search[have] = search_figures(col, version, q)
            print(f"{have} segments: {search[have]}", file=sys.stderr, flush=True)
        if have >= max(want):
            break
        mutate(files, 0.01, rng, f"chain{have}")
        res = col.refresh(version)
        chain_s.append((res.manifest.stats["seconds"], res.manifest.stats["shard_seconds"]))
        version, have = res.version, min(len(s.segments) for s in res.manifest.shards)
    # `embray compact` of the 8-segment version: a child with whole shards, the same rows.
    t = time.perf_counter()
    compacted = col.compact(version)
    compact_cmd_s, compact_cmd_wall = compacted.manifest.stats["seconds"], time.perf_counter() - t
    print(f"embray compact: {compact_cmd_s:.1f}s, {compact_cmd_wall:.1f}s wall", file=sys.stderr, flush=True)
    search["compacted"] = search_figures(col, compacted.version, q)
    # One more refresh past max_segments (8): the compaction.
    mutate(files, 0.01, rng, "compact")
    t = time.perf_counter()
    res = col.refresh(version)
    compact_s = res.manifest.stats["seconds"]
    compact_segments = max(len(s.segments) for s in res.manifest.shards)
    print(f"compaction: {compact_s:.1f}s, {time.perf_counter() - t:.1f}s wall", file=sys.stderr, flush=True)
    ray.shutdown()

    begin, end = marks(args.model)
    flag, built_by, model = "", "", "`hash` backend (no model load)"
    warmed = "workers started; no warm actor (`keep_warm_s: 0`): each refresh embeds in one plain Ray task"
    if args.model != "hash":
        flag, built_by = f" --model {args.model}", f" --model {args.model} --docs 20000"
        model = "sentence-transformers all-MiniLM-L6-v2 (the backfill includes one model load)"
        warmed = "workers started, the model loaded in its warm actor, which embeds the refreshes' texts"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    lines = [
        begin,
        "## Delta segments: refresh cost and search cost" + ("" if args.model == "hash" else " (MiniLM)"),
        "",
        f"Command: `.venv/bin/python bench/segments.py{flag} --segments {args.segments} --queries {args.queries}` "
        f"(commit {commit.stdout.strip() or '?'}), from the collection `bench/serve_groups.py{built_by}` builds.",
        "",
        f"Machine: {machine()}.",
        "",
        f"Collection: {rows:,} rows, {model}, {dims} dims, 8 shards, f16 HNSW; its "
        f"backfill's build took {backfill_s:.0f} s. A 1% change = {round(rows * 0.01):,} rows: 0.4% inserted, "
        "0.4% updated, 0.2% deleted, at random over the 16 source files (or within one). Ray was warmed up "
        f"first ({warmed}: what a cold job pays once is left out). "
        "Build seconds are the manifest's (run start to commit); bytes written are the files the new version "
        "holds itself; the changed rows' vector bytes are inserted + updated rows x dims x 4.",
        "",
        "| refresh of a 1% change | shards as delta | build s | / backfill build s | shard stage s "
        "| bytes written MB | / changed rows' vector bytes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (
        ("delta", "random rows, delta segments (default)"),
        ("onefile", "one file, delta segments"),
        ("inplace", "random rows, segments off (graphs updated in place)"),
    ):
        o = out[name]
        vec = o["changed"] * dims * 4
        lines.append(
            f"| {label} | {o['delta']} | {o['build_s']:.1f} | {o['build_s'] / backfill_s:.4f} | {o['shard_s']:.1f} "
            f"| {o['bytes'] / 1e6:.1f} | {o['bytes'] / vec:.2f} |"
        )
    med, med_shard = (statistics.median(c[i] for c in chain_s) for i in (0, 1))
    lines.append(
        f"| random rows, delta segments, each refresh of the chain below (median of {len(chain_s)}) | 8 "
        f"| {med:.1f} | {med / backfill_s:.4f} | {med_shard:.1f} | | |"
    )
    lines += [
        "",
        f"Search, {args.queries} vector queries one at a time in process (k = 10; a stored vector plus noise), "
        "recall@10 against exact search of the same version:",
        "",
        "| segments per shard | p50 ms | p99 ms | p50 / whole shards | recall@10 | open s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in [*sorted(n for n in search if n != "compacted"), "compacted"]:
        p50, p99, rec, opened = search[n]
        label = "0 (`embray compact` of the 8)" if n == "compacted" else n
        lines.append(f"| {label} | {p50:.2f} | {p99:.2f} | {p50 / search[0][0]:.2f} | {rec:.3f} | {opened:.1f} |")
    lines += [
        "",
        f"`embray compact` of the 8-segment version took {compact_cmd_s:.1f} s (build seconds; "
        f"{compact_cmd_wall:.1f} s wall, reading no source file and embedding nothing). "
        f"The refresh past `index.max_segments` (8) compacted every shard in {compact_s:.1f} s "
        f"(build seconds; segments left after it: {compact_segments}).",
        end,
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(begin, end, text)


if __name__ == "__main__":
    main()
