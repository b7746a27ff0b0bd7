"""Keyword and hybrid search through embray itself (issue 28): the known-item set of bench/known_items.py
(API reference documents; queries that are identifiers or exact phrases, each with one right document)
built as a collection and asked in each mode.

    .venv/bin/python bench/hybrid.py [--docs 2000] [--seed 0] [--write]

One local Ray; the offline MiniLM (`sentence-transformers`, bf16 where the CPU has it), `index.keywords:
true`, `chunk:` left to the new-collection default (passages sized to the model's window), 2 shards, f16
HNSW. Every query through `Collection.search_many(texts, k=10, mode=...)`: what a user's request gets
(HNSW, not exact search; documents by their best passage; hybrid with the shipped fusion settings). Reported:
recall@10 per query kind and mode (the right document among the 10 hits), the build's seconds and
milliseconds per query per mode. --write puts the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import ROOT, machine, write_section  # noqa: E402 - the sibling benchmark's helpers
from known_items import known_item_set  # noqa: E402

MARK_BEGIN = "<!-- bench/hybrid.py begin -->"
MARK_END = "<!-- bench/hybrid.py end -->"
MODES = ("vector", "keyword", "hybrid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--workdir", default=None, help="Where the corpus and store go (kept with --keep: reused).")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument(
        "--weights", default=None, help="Also try hybrid with these vector:keyword weights, e.g. 1:2,1:4 (not written)."
    )
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="embray-bench-hybrid-"))
    try:
        run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embray import Collection
    from embray.config import parse_config
    from embray.keywords import HYBRID_DEPTH, HYBRID_WEIGHTS, RRF_K0

    docs, queries = known_item_set(args.docs, args.seed)
    fresh = not (work / "corpus").exists()
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    for f in range(4 if fresh else 0):
        part = docs[f::4]
        pq.write_table(
            pa.table({"id": [i for i, _ in part], "text": [t for _, t in part]}), work / f"corpus/{f}.parquet"
        )
    cfg = parse_config(
        {
            "collection": "api",
            "source": {"uri": str(work / "corpus")},
            "store": {"uri": str(work / "store")},
            "model": {"backend": "sentence-transformers", "name": "all-MiniLM-L6-v2", "precision": "bf16"},
            "index": {"shards": 2, "keywords": True},
            "embed": {"actors": 1, "num_cpus": 1},
        },
        base_dir=work,
    )
    col = Collection(cfg)
    if fresh:
        col.backfill(promote=True)
    built = col.manifest()
    print(f"built {built.version}: {built.rows} passages of {len(docs)} documents in {built.stats.seconds:.0f} s")
    texts = [q for q, _, _ in queries]
    kinds = sorted({kind for _, kind, _ in queries})
    recall: dict[tuple[str, str], float] = {}
    ms: dict[str, float] = {}
    col.search_many(texts[:8], k=10, mode="hybrid")  # warm: the encoder, the shards, the keyword indexes
    for mode in MODES:
        t = time.perf_counter()
        answers = col.search_many(texts, k=10, mode=mode)
        ms[mode] = (time.perf_counter() - t) * 1000 / len(texts)
        for kind in [*kinds, "all"]:
            hit = [
                want in {h.id for h in a.results}
                for (_, k, want), a in zip(queries, answers, strict=True)
                if kind in ("all", k)
            ]
            recall[(mode, kind)] = sum(hit) / len(hit)
    lines = [
        f"| mode | {' | '.join(f'recall@10, {k} ({sum(1 for _, q, _ in queries if q == k)})' for k in kinds)} "
        "| recall@10, all | ms per query (batches of all) |",
        "| --- | " + " | ".join("---:" for _ in kinds) + " | ---: | ---: |",
    ]
    for mode in MODES:
        cells = " | ".join(f"{recall[(mode, k)]:.3f}" for k in kinds)
        lines.append(f"| {mode} | {cells} | {recall[(mode, 'all')]:.3f} | {ms[mode]:.1f} |")
    table = "\n".join(lines)
    print(table)
    for pair in (args.weights or "").split(",") if args.weights else []:
        wv, wk = (float(x) for x in pair.split(":"))
        answers = col.search_many(texts, k=10, mode="hybrid", weights={"vector": wv, "keyword": wk})
        got = {
            kind: sum(
                want in {h.id for h in a.results}
                for (_, k, want), a in zip(queries, answers, strict=True)
                if kind in ("all", k)
            )
            / sum(1 for _, k, _ in queries if kind in ("all", k))
            for kind in [*kinds, "all"]
        }
        print(f"hybrid {wv:g}:{wk:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in got.items()))
    best = max(recall[("vector", "identifier")], recall[("keyword", "identifier")])
    print(
        f"hybrid >= better of the two on identifiers: {recall[('hybrid', 'identifier')] >= best}; "
        f">= vector + 0.1: {recall[('hybrid', 'identifier')] >= recall[('vector', 'identifier')] + 0.1}"
    )
    if args.write:
        text = (
            f"{MARK_BEGIN}\n## Keyword and hybrid search through embray (issue 28)\n\n"
            f"Command: `.venv/bin/python bench/hybrid.py --docs {args.docs} --seed {args.seed}`\n\n"
            f"Machine: {machine()}\n\n"
            f"Collection: {len(docs):,} API reference documents (bench/known_items.py, seed {args.seed}) as "
            f"{built.rows:,} passages, MiniLM bf16, 2 shards, f16 HNSW, `index.keywords: true`; built in "
            f"{built.stats.seconds:.0f} s. {len(queries)} known-item queries (each with one right "
            "document) through `Collection.search_many(k=10, mode=...)`: HNSW, documents by best passage, hybrid "
            f"with the shipped fusion (depth {HYBRID_DEPTH}, k0 {RRF_K0}, weights vector:keyword "
            f"{HYBRID_WEIGHTS[0]:g}:{HYBRID_WEIGHTS[1]:g}).\n\n{table}\n{MARK_END}"
        )
        write_section(MARK_BEGIN, MARK_END, text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
