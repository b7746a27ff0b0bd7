"""HNSW build parameters on real MiniLM vectors: USearch build time vs recall@10, single-threaded.

    .venv/bin/python bench/hnsw_params.py [--n 20000] [--queries 500] [--connectivity 8,12,16,32]
                                          [--expansion-add 32,64,128] [--expansion-search 64] [--threads 1]
                                          [--rounds 1] [--workdir /tmp/embray-bench-hnsw] [--write]

Texts: --n unique passages, exact duplicates dropped: the stdlib docstrings of the demo corpus
(`embray.demo.collect`) and the man pages of this machine (`tests.helpers.man_pages`) cut into passages of 64
words, in a stable order (sha256 of each text). They are embedded as embray embeds documents
(`load_embedder(ModelSpec(name="all-MiniLM-L6-v2", precision="bf16"))`, the demo config's model, offline,
`embed_documents`: L2-normalised float32) and cached under --workdir (keyed by the model's fingerprint and each
text's sha256), so a rerun embeds only texts it has not embedded before. --queries of them (spread evenly) are
held out: they are the queries and are NOT in the index, so no query finds itself. Ground truth: exact top-10
by cosine in float32 (numpy).
For each connectivity (M) x expansion_add: a fresh USearch `Index` as embray's shards make one (metric cos, dtype
f16, embray/pipeline/shards.py `_new_index`), `index.add` of the n - queries vectors with --threads threads (one:
an embray shard task reserves one CPU), timed; then the queries searched at --expansion-search (embray's
default 64), one thread: recall@10 against the exact top-10 and the search time per query (median of 3
passes). The recall ceiling of f16 itself is the same search with `exact=True`. --write puts the table into
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import ROOT, machine, write_section  # noqa: E402 - the sibling benchmark's helpers; puts ROOT on sys.path

MARK_BEGIN = "<!-- bench/hnsw_params.py begin -->"
MARK_END = "<!-- bench/hnsw_params.py end -->"
PASSAGE_WORDS = 64
K = 10


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def passages(n: int) -> tuple[list[str], dict[str, int]]:
    """``n`` unique texts: docstrings and man-page passages in sha256 order; and how many came from each."""
    from embray.demo import collect
    from tests.helpers import man_pages

    pool: dict[str, str] = {}  # text -> where it came from
    for doc in collect(100_000).values():
        pool.setdefault(" ".join(doc.split()), "docstrings")
    for _, _, body in man_pages(100_000):
        words = body.split()
        for i in range(0, len(words) - PASSAGE_WORDS // 2, PASSAGE_WORDS):  # the last short tail is left out
            pool.setdefault(" ".join(words[i : i + PASSAGE_WORDS]), "man-page passages")
    if len(pool) < n:
        raise SystemExit(
            f"only {len(pool)} unique texts on this machine (docstrings and man pages); use --n {len(pool)}"
        )
    texts = sorted(pool, key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:n]
    sources: dict[str, int] = {}
    for t in texts:
        sources[pool[t]] = sources.get(pool[t], 0) + 1
    return texts, sources


def embed(texts: list[str], workdir: Path, batch: int) -> tuple[object, int, float, str]:
    """Vectors of ``texts``, through a cache under ``workdir`` keyed by the model's fingerprint and each text's
    sha256 (two .npy files), so a rerun embeds only texts it has not seen. Returns (vectors, texts embedded now,
    seconds that took, model label)."""
    import numpy as np

    from embray.models import ModelSpec, fingerprint, load_embedder

    spec = ModelSpec(backend="sentence-transformers", name="all-MiniLM-L6-v2", precision="bf16")
    stem = workdir / f"minilm-{fingerprint(spec)[:16]}"
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    cached: dict[str, object] = {}
    if stem.with_suffix(".hashes.npy").exists():
        old_h, old_v = np.load(stem.with_suffix(".hashes.npy")), np.load(stem.with_suffix(".vectors.npy"))
        cached = dict(zip(old_h.tolist(), old_v, strict=True))
    todo = [i for i, h in enumerate(hashes) if h not in cached]
    say(f"{len(texts) - len(todo)} vectors from the cache {stem}.*.npy, {len(todo)} to embed")
    seconds = 0.0
    if todo:
        embedder = load_embedder(spec)
        t = time.perf_counter()
        for start in range(0, len(todo), batch):
            part = todo[start : start + batch]
            for i, v in zip(part, embedder.embed_documents([texts[i] for i in part]), strict=True):
                cached[hashes[i]] = v
            done, rate = start + len(part), (start + len(part)) / (time.perf_counter() - t)
            say(f"embedded {done}/{len(todo)} ({rate:.0f} texts/s, {(len(todo) - done) / rate:.0f}s left)")
        seconds = time.perf_counter() - t
        workdir.mkdir(parents=True, exist_ok=True)
        for suffix, value in ((".vectors.npy", np.stack(list(cached.values()))), (".hashes.npy", list(cached))):
            tmp = stem.with_suffix(".part" + suffix)
            np.save(tmp, np.asarray(value, dtype=np.float32 if suffix == ".vectors.npy" else "U64"))
            tmp.rename(stem.with_suffix(suffix))
    return np.stack([cached[h] for h in hashes]).astype(np.float32), len(todo), seconds, spec.label


def exact_topk(base, queries, k: int):
    """Row numbers of each query's k nearest base vectors by cosine (both L2-normalised), best first."""
    import numpy as np

    sims = queries @ base.T
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def recall(found, truth) -> float:
    """Mean share of each query's exact top-k that the search returned."""
    return sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)) / truth.size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="texts embedded (index: n - queries of them)")
    ap.add_argument("--queries", type=int, default=500, help="held-out query vectors (not in the index)")
    ap.add_argument("--connectivity", default="8,12,16,32")
    ap.add_argument("--expansion-add", default="32,64,128")
    ap.add_argument("--expansion-search", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="threads of index.add (0: USearch's default, all cores)")
    ap.add_argument("--rounds", type=int, default=1, help="builds of each setting (build seconds: the median)")
    ap.add_argument("--batch-size", type=int, default=256, help="texts per embed_documents call")
    ap.add_argument("--workdir", default="/tmp/embray-bench-hnsw", help="where the vectors are cached")
    ap.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = ap.parse_args()
    if not 0 < args.queries < args.n // 2:
        ap.error("--queries must be between 1 and half of --n")

    import numpy as np
    import usearch
    from usearch.index import Index

    from embray.config import IndexConfig

    t0 = time.perf_counter()
    texts, sources = passages(args.n)
    mean_words = statistics.mean(len(t.split()) for t in texts)
    vectors, embedded, embed_s, model = embed(texts, Path(args.workdir), args.batch_size)
    held = np.zeros(len(vectors), dtype=bool)
    held[np.linspace(0, len(vectors) - 1, args.queries).astype(int)] = True
    queries, base = vectors[held], vectors[~held]
    truth = exact_topk(base, queries, K)
    keys = np.arange(len(base), dtype=np.uint64)
    default = IndexConfig()  # embray's defaults: the row to compare against
    say(f"{len(base)} vectors indexed, {len(queries)} held-out queries")

    def new_index(m: int, ef_add: int) -> Index:
        return Index(
            ndim=base.shape[1],
            metric=default.metric,
            dtype=default.dtype,
            connectivity=m,
            expansion_add=ef_add,
            expansion_search=args.expansion_search,
        )

    rows = []
    ceiling = None
    for m in ints(args.connectivity):
        for ef in ints(args.expansion_add):
            secs = []
            for _ in range(args.rounds):
                index = new_index(m, ef)
                t = time.perf_counter()
                index.add(keys, base, threads=args.threads)
                secs.append(time.perf_counter() - t)
            search = []
            for _ in range(3):  # the median of 3 passes: one pass over 500 queries is a fraction of a second
                t = time.perf_counter()
                found = index.search(queries, K, threads=1).keys
                search.append(time.perf_counter() - t)
            search_s = statistics.median(search)
            if ceiling is None:
                ceiling = recall(index.search(queries, K, threads=1, exact=True).keys, truth)
            r = recall(found, truth)
            rows.append((m, ef, statistics.median(secs), r, search_s / len(queries), index.serialized_length))
            say(
                f"connectivity {m}, expansion_add {ef}: build {statistics.median(secs):.2f}s, recall@10 {r:.4f}, "
                f"search {search_s / len(queries) * 1e3:.3f} ms/query"
            )
    total_s = time.perf_counter() - t0

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    lines = [
        MARK_BEGIN,
        "## HNSW build parameters: build time vs recall@10 on MiniLM vectors",
        "",
        f"Command: `.venv/bin/python bench/hnsw_params.py --n {args.n} --queries {args.queries} "
        f"--connectivity {args.connectivity} --expansion-add {args.expansion_add} "
        f"--expansion-search {args.expansion_search} --threads {args.threads} --rounds {args.rounds}` "
        f"(commit {commit.stdout.strip() or '?'})",
        "",
        f"Machine: {machine()}.",
        "",
        f"Vectors: {args.n} unique texts ("
        + ", ".join(f"{v} {k}" for k, v in sorted(sources.items()))
        + f" of {PASSAGE_WORDS} words; mean {mean_words:.0f} words) embedded by {model} in bf16 as embray embeds "
        f"documents ({base.shape[1]} dims, L2-normalised"
        + (f"; {embedded} of them embedded in this run, {embedded / embed_s:.0f} texts/s" if embedded else "")
        + f"). The index holds {len(base)} of them; the other {len(queries)}, spread evenly, are the queries and "
        "are not in the index (no query finds itself). Ground truth: exact top-10 by cosine in float32 (numpy). "
        f"Each index is USearch {usearch.__version__}, metric {default.metric}, dtype {default.dtype}, "
        f"built by one `index.add` of all vectors with {args.threads or 'all'} thread(s)"
        + (f", median of {args.rounds} builds" if args.rounds > 1 else ", one build")
        + f"; searched at expansion_search {args.expansion_search}, one thread, k = 10. Recall ceiling of f16 "
        f"vectors (`exact=True` search of the index): {ceiling:.4f}. embray's default is connectivity "
        f"{default.connectivity}, expansion_add {default.expansion_add}.",
        "",
        "| connectivity | expansion_add | build s | vectors/s | recall@10 | search ms/query | index MB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m, ef, s, r, q, size in rows:
        mark = " (embray default)" if (m, ef) == (default.connectivity, default.expansion_add) else ""
        lines.append(
            f"| {m}{mark} | {ef} | {s:.2f} | {len(base) / s:.0f} | {r:.4f} | {q * 1e3:.3f} | {size / 1e6:.1f} |"
        )
    lines += [
        "",
        f"Whole run: {total_s:.0f} s" + (f", {embed_s:.0f} s of it embedding." if embedded else "."),
        MARK_END,
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(MARK_BEGIN, MARK_END, text)


if __name__ == "__main__":
    main()
