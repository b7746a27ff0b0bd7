"""Filtered search at scale (issue 28): recall and latency of metadata filters of 0.1%, 1%, 10% and 50%
selectivity against unfiltered search, side by side on one version.

    .venv/bin/python bench/filters.py [--rows 1000000] [--files 50] [--shards 8] [--queries 200] [--rounds 3]
                                      [--workdir DIR] [--keep] [--write]

One local Ray; the `hash` model (384 dims: the pipeline and the index, not an encoder). The corpus: --rows
texts of random words (:func:`write_corpus`) with a metadata column ``bucket`` (0..999 at random per row), so
``{"bucket": {"$lt": b}}`` lets through b/1000 of the rows; built once (`source.columns: [bucket]`, f16 HNSW,
--shards shards). The queries: --queries stored texts of random rows less one word, embedded once. For each filter (and
none), in rounds that take turns: every query alone (k = 10, `VersionIndex.search_vectors`, the filter
parsed per query as a request would, its matches cached per version), its latency; recall@10 against exact
search under the same filter (brute force over every matching row of every shard; a hit as good as the exact
10th counts as found).
Reported: p50 / p99 ms (median over rounds), the ratio of each p50 to the unfiltered p50, recall@10, the
path each part took, and the median latency of a filter's first query (its matches not cached: 20 queries,
the cache cleared before each). --write puts the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import ROOT, machine, write_section  # noqa: E402 - the sibling benchmark's helpers

sys.path.insert(0, str(ROOT))
MARK_BEGIN = "<!-- bench/filters.py begin -->"
MARK_END = "<!-- bench/filters.py end -->"
SHARES = (None, 0.5, 0.1, 0.01, 0.001)


def write_corpus(root: Path, rows: int, files: int, seed: int = 7) -> None:
    """--rows texts of 8-16 words drawn (Zipf, a = 1.15) from 50,000 made-up words, so that rows share words
    as text does but hardly two are alike (duplicates would make ties that no ANN index orders like exact
    search), and ``bucket``: 0..999 uniformly."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i:05d}" for i in range(50_000)])
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        ks = np.arange(f, rows, files)
        lens = rng.integers(8, 17, len(ks))
        words = (rng.zipf(1.15, int(lens.sum())) - 1) % len(vocab)
        cuts = np.cumsum(lens)[:-1]
        texts = [" ".join(w) for w in np.split(vocab[words], cuts)]
        table = pa.table(
            {
                "id": [f"r{k:08d}" for k in ks],
                "text": texts,
                "bucket": pa.array(rng.integers(0, 1000, len(ks)), pa.int32()),
            }
        )
        pq.write_table(table, root / f"p{f:04d}.parquet")


def query_texts(root: Path, n: int, seed: int = 11) -> list[str]:
    """``n`` stored texts of random rows (the first file's), each with one word dropped: near, not equal."""
    import pyarrow.parquet as pq

    texts = pq.read_table(sorted(root.glob("*.parquet"))[0], columns=["text"]).column("text").to_pylist()
    rng = random.Random(seed)
    out = []
    for t in rng.sample(texts, n):
        words = t.split()
        del words[rng.randrange(len(words))]
        out.append(" ".join(words))
    return out


def spec_of(share: float | None) -> dict | None:
    return None if share is None else {"bucket": {"$lt": round(share * 1000)}}


def recall(ann, exact, eps: float = 1e-5) -> float:
    if not exact:
        return 1.0
    kth = exact[-1].score
    ids = {h.id for h in exact}
    return sum(1 for h in ann if h.id in ids or h.score >= kth - eps) / len(exact)


def paths(index, share: float | None) -> str:
    """How the parts answer a filter of this share: exactly over the matching rows, or on the graph."""
    from embray.filtered import uses_graph
    from embray.filters import parse_filter
    from embray.storage import metadata as M

    if share is None:
        return "graph"
    f = parse_filter(spec_of(share), M.schema(index.columns))
    kinds = set()
    for part, got in zip(index.shards, index.matches(f), strict=True):
        graph, count = uses_graph(part.index, 10, len(got.keys))
        kinds.add(f"graph, ~{round(count, -1)} candidates" if graph else "exact")
    return "; ".join(sorted(kinds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="Where the corpus and store go (kept with --keep: reused).")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--write", action="store_true", help="Write the table into docs/benchmarks.md.")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="embray-bench-filters-"))
    try:
        run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    import numpy as np

    from embray import Collection
    from embray.config import parse_config

    cfg = parse_config(
        {
            "collection": "filters",
            "source": {"uri": str(work / "corpus"), "columns": ["bucket"]},
            "store": {"uri": str(work / "store")},
            "model": {"backend": "hash", "name": "w", "dims": 384},
            "index": {"shards": args.shards, "dtype": "f16"},
            "embed": {"batch_size": 2048, "actors": 1, "num_cpus": 1, "keep_warm_s": 0},
        },
        base_dir=work,
    )
    col = Collection(cfg)
    if not (work / "corpus").exists():
        t = time.perf_counter()
        write_corpus(work / "corpus", args.rows, args.files)
        print(f"corpus: {args.rows} rows in {time.perf_counter() - t:.0f} s", flush=True)
    if not col.versions():
        built = col.backfill()
        print(f"backfill {built.version}: {built.manifest.stats.seconds:.0f} s", flush=True)
    index = col.index()
    q = index.embedder.embed_queries(query_texts(work / "corpus", args.queries))
    t = time.perf_counter()
    index.search_vectors(q[:1], 10)  # touch every shard
    print(f"opened and warmed in {time.perf_counter() - t:.1f} s", flush=True)
    exact = {s: index.search_vectors(q, 10, exact=True, filter=spec_of(s)) for s in SHARES}
    lat: dict[float | None, list[list[float]]] = {s: [] for s in SHARES}
    rec: dict[float | None, float] = {}
    for r in range(args.rounds):
        order = list(SHARES) if r % 2 == 0 else list(reversed(SHARES))
        for s in order:
            times, found = [], []
            for i in range(len(q)):
                t = time.perf_counter()
                hits = index.search_vectors(q[i : i + 1], 10, filter=spec_of(s))[0]
                times.append((time.perf_counter() - t) * 1000)
                found.append(recall(hits, exact[s][i]))
            lat[s].append(times)
            rec[s] = float(np.mean(found))
        print(f"round {r + 1} done", flush=True)
    cold: dict[float | None, float] = {}
    for s in SHARES:  # the first query with a filter not asked before: it is evaluated on every part
        times = []
        for i in range(min(20, len(q))):
            index.forget_filters()
            t = time.perf_counter()
            index.search_vectors(q[i : i + 1], 10, filter=spec_of(s))
            times.append((time.perf_counter() - t) * 1000)
        cold[s] = statistics.median(times)
    p50 = {s: statistics.median(float(np.percentile(x, 50)) for x in lat[s]) for s in SHARES}
    p99 = {s: statistics.median(float(np.percentile(x, 99)) for x in lat[s]) for s in SHARES}
    lines = [
        "| filter | share of rows | path per part | recall@10 vs exact filtered (/ unfiltered's) | p50 ms | p99 ms "
        "| p50 / unfiltered "
        "| a new filter's first query, ms |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in SHARES:
        name = "none" if s is None else f"`bucket < {round(s * 1000)}`"
        share = "100%" if s is None else f"{s:.1%}"
        lines.append(
            f"| {name} | {share} | {paths(index, s)} | {rec[s]:.4f} ({rec[s] / rec[None]:.2f}x) | {p50[s]:.2f} | "
            f"{p99[s]:.2f} | "
            f"{p50[s] / p50[None]:.2f}x | {cold[s]:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write:
        cmd = (
            f"`.venv/bin/python bench/filters.py --rows {args.rows} --files {args.files} --shards {args.shards} "
            f"--queries {args.queries} --rounds {args.rounds}`"
        )
        text = (
            f"{MARK_BEGIN}\n## Filtered search (issue 28)\n\nCommand: {cmd}\n\nMachine: {machine()}\n\n"
            f"Version: {args.rows:,} rows, `hash` model (384 dims), {args.shards} shards, f16 HNSW (M 16, ef 64), "
            "metadata column `bucket` (uniform 0..999). One query at a time, k = 10, the filter parsed per query "
            "and its matches cached per version (the last column: uncached); medians of "
            f"{args.rounds} interleaved rounds of {args.queries} queries.\n\n{table}\n{MARK_END}"
        )
        write_section(MARK_BEGIN, MARK_END, text)


if __name__ == "__main__":
    main()
