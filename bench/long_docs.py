"""Long documents (issue 27): known-item recall@10 with chunking off and on, and what embedding every passage costs.

    .venv/bin/python bench/long_docs.py [--pages 300] [--write]

Corpus: --pages man pages of this machine (tests/helpers.man_pages, sections 1 and 8: prose, most of them many
times all-MiniLM-L6-v2's 256-token window). Queries: one sentence of 8-40 words per page, taken from beyond its
first 3,000 characters (a stable pick by hash), so one vector per page, which reads about its first 1,000-1,300
characters, cannot have seen it. A query finds its page when the page is among the 10 documents returned.

In one process, on a local Ray already up, the same model (MiniLM, bf16 where native, as the quickstart):
  rows      embray backfill with chunk: none, Collection.search(k=10) (one vector per page, truncated)
  passages  embray backfill with chunk: {tokens: null, overlap: 32}, Collection.search(k=10) (documents: each
            scored by its best passage; HNSW over passages)
  exact     exact search over the same passages with the same model: the chunked version's stored vectors,
            brute force, a page scored by its best passage (what the HNSW + grouping of `passages` approximate)
Recall@10 over all pages and over pages longer than 4 model windows; the backfills' wall time and the tokens
they sent to the model (per passage: its tokens and the model's 2 special tokens; per row: up to the window),
as seconds per million tokens. --write puts the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.helpers: the man pages; bench.backfill: the machine line and the doc writer
MARK_BEGIN = "<!-- bench/long_docs.py begin -->"
MARK_END = "<!-- bench/long_docs.py end -->"
DEEP = 3000  # queries come from beyond this many characters of their page
K = 10


def query_of(name: str, body: str) -> str | None:
    """A sentence of 8-40 words from beyond the page's first DEEP characters (a stable pick), or None."""
    tail = body[DEEP:]
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", tail)]
    fit = [s for s in sentences[1:] if 8 <= len(s.split()) <= 40]
    if not fit:
        return None
    return fit[int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(fit)]


def recall(found: list[list], want: list, mask: np.ndarray) -> float:
    hits = np.array([w in f[:K] for f, w in zip(found, want, strict=True)])
    return float(hits[mask].mean()) if mask.any() else float("nan")


def exact_over_passages(col, version: str, queries: np.ndarray) -> list[list]:
    """Per query, the top K documents by their best passage, brute force over the version's stored vectors."""
    df = col.dataset(version).to_pandas()
    vecs = np.stack(df["vector"].to_numpy()).astype(np.float32)
    docs = df["doc"].to_numpy()
    names, inverse = np.unique(docs, return_inverse=True)
    out = []
    for q in queries:
        scores = vecs @ q
        best = np.full(len(names), -np.inf, dtype=np.float32)
        np.maximum.at(best, inverse, scores)
        out.append(list(names[np.argsort(-best, kind="stable")[:K]]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=300)
    ap.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from bench.backfill import machine, write_section
    from embray import Collection
    from embray.config import ChunkConfig, parse_config
    from embray.models import ModelSpec
    from embray.pipeline.passages import chunk_meta, cutter, model_window
    from tests.helpers import man_pages

    pages = [(n, b) for n, _, b in man_pages(args.pages * 2, min_chars=DEEP + 1500)]
    pages = [(n, b, q) for n, b in pages if (q := query_of(n, b))][: args.pages]
    tmp = Path(tempfile.mkdtemp(prefix="embray-longdocs-"))
    corpus = tmp / "corpus"
    corpus.mkdir()
    for f in range(4):
        part = pages[f::4]
        pq.write_table(pa.table({"id": [p[0] for p in part], "text": [p[1] for p in part]}), corpus / f"p{f}.parquet")
    model = {"backend": "sentence-transformers", "name": "all-MiniLM-L6-v2", "precision": "bf16"}
    spec = ModelSpec(**model)
    window = model_window(spec)
    cut = cutter(chunk_meta(ChunkConfig(), spec), spec)
    tok = cut.tokenizer
    doc_tokens = np.array([len(tok.encode(b, add_special_tokens=False).ids) for _, b, _ in pages])
    long = doc_tokens > 4 * window
    row_tokens = int(np.minimum(doc_tokens + 2, window).sum())
    passage_tokens = sum(p.tokens + 2 for _, b, _ in pages for p in cut.cut(b))

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = {}
    for name, chunk in (("rows", "none"), ("passages", {"tokens": None, "overlap": 32})):
        cfg = parse_config(
            {
                "collection": "man",
                "source": {"uri": str(corpus)},
                "store": {"uri": str(tmp / f"store-{name}")},
                "model": model,
                "chunk": chunk,
                "index": {"shards": 2},
                "embed": {"actors": 1, "num_cpus": 1, "keep_warm_s": 0},
            }
        )
        col = Collection(cfg)
        t = time.perf_counter()
        built = col.backfill()
        seconds = time.perf_counter() - t
        queries = [q for _, _, q in pages]
        found = [[h.id for h in col.search(q, k=K).results] for q in queries]
        stats = built.manifest.stats
        results[name] = {
            "col": col,
            "version": built.version,
            "seconds": seconds,
            "scan_plan": stats.plan_seconds,
            "embed": stats.embed_seconds,
            "found": found,
            "rows": built.rows,
        }
    want = [n for n, _, _ in pages]
    qv = results["passages"]["col"].index().embedder.embed_queries([q for _, _, q in pages])
    exact = exact_over_passages(results["passages"]["col"], results["passages"]["version"], qv)
    everyone = np.ones(len(pages), dtype=bool)
    r = {name: (recall(v["found"], want, everyone), recall(v["found"], want, long)) for name, v in results.items()}
    r["exact"] = (recall(exact, want, everyone), recall(exact, want, long))
    per_m = {  # the embed stage's seconds (pool start and model load included) per million tokens embedded
        "rows": results["rows"]["embed"] / row_tokens * 1e6,
        "passages": results["passages"]["embed"] / passage_tokens * 1e6,
    }
    lines = [
        MARK_BEGIN,
        "## Long documents: recall with chunking off and on (issue 27)",
        "",
        f"`.venv/bin/python bench/long_docs.py --pages {args.pages}` on {machine()}; CPU flags: "
        + " ".join(sorted(set(re.findall(r"\b(avx512\w*|amx\w*|avx2)\b", Path("/proc/cpuinfo").read_text())))),
        "",
        f"{len(pages)} man pages of this machine (mean {int(np.mean([len(b) for _, b, _ in pages])):,} characters, "
        f"{int(long.sum())} longer than 4 windows of {window} tokens); one query per page, a sentence from beyond "
        f"its first {DEEP:,} characters; all-MiniLM-L6-v2 (bf16). recall@{K}: the page among the {K} documents "
        "returned.",
        "",
        "| | vectors | recall@10, all pages | pages > 4 windows | backfill s | scan + plan s | embed s "
        "| tokens embedded | embed s per 1M tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {label} | {results[n]['rows']:,} | {r[n][0]:.3f} | {r[n][1]:.3f} | {results[n]['seconds']:.1f} | "
            f"{results[n]['scan_plan']:.1f} | {results[n]['embed']:.1f} | {tokens:,} | {per_m[n]:.0f} |"
            for n, label, tokens in (
                ("rows", "one vector per page (`chunk: none`)", row_tokens),
                ("passages", "passages (`chunk: {tokens: null, overlap: 32}`)", passage_tokens),
            )
        ),
        f"| exact search over the same passages | | {r['exact'][0]:.3f} | {r['exact'][1]:.3f} | | | | | |",
        "",
        f"Passages / exact over the same passages: {r['passages'][0] / max(r['exact'][0], 1e-9):.3f} (all), "
        f"{r['passages'][1] / max(r['exact'][1], 1e-9):.3f} (> 4 windows). Passages / one vector per page: "
        f"{r['passages'][0] / max(r['rows'][0], 1e-9):.2f}x (all), {r['passages'][1] / max(r['rows'][1], 1e-9):.2f}x "
        f"(> 4 windows). Embedding cost per million tokens, passages / rows: {per_m['passages'] / per_m['rows']:.2f} "
        "(the embed stage includes the actor's start and the model's load, which weigh most on the small job of "
        "one vector per page; scan + plan includes cutting the passages).",
        MARK_END,
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(MARK_BEGIN, MARK_END, text)


if __name__ == "__main__":
    main()
