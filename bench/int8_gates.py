"""Does a CPU int8 path keep MiniLM's vector space? Issue 30's gates, measured for torch dynamic int8.

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python bench/int8_gates.py [--threads 2]

An int8 path may run in place of fp32 (same fingerprint) only where its quality is proven equal: STS-B
Spearman >= 0.815 and recall@10 within 1% of fp32 on two retrieval sets. This measures, for all-MiniLM-L6-v2
with ``torch.ao.quantization.quantize_dynamic`` (int8 weights per output channel, activations per tensor at run
time; engine ``onednn``, which honours ``ONEDNN_MAX_CPU_ISA``, so an AVX2 CPU can be emulated):

* ``all``: every Linear layer quantised; ``no-ffn-out``: all but the feed-forward output projections (the
  layers whose inputs carry the largest activation outliers).
* STS-B (../shared/data/stsb, the test split): the Spearman of cosine with the gold scores.
* *known items*: ``bench/known_items.py``'s set (stdlib API documents; identifier and phrase queries, one
  right answer each), exact cosine search, recall@10.
* *man pages*: ``bench/long_docs.py``'s deep queries (a sentence from beyond a page's first 3,000 characters)
  over each page's first 12,000 characters in passages of 1,000 characters, a page scored by its best passage,
  recall@10.

Each set is scored with int8 on both sides, and mixed with fp32 (int8 documents, fp32 queries and the
reverse): a version built on one machine is queried by replicas on others, so an int8 path that shares the
fingerprint must hold in the mixed case too. Also: the cosine of each int8 vector to its fp32 vector, and the
time to embed all sets (one process, --threads threads, fp32 first).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sets(n_docs: int, n_pages: int) -> dict:
    from known_items import known_item_set
    from long_docs import query_of

    from tests.helpers import man_pages, read_stsb

    gold, left, right = read_stsb()
    docs, queries = known_item_set(n_docs, 0)
    pages = man_pages(n_pages, 3000)
    deep, deep_page, passages, passage_page = [], [], [], []
    for i, (name, _, body) in enumerate(pages):
        if q := query_of(name, body):
            deep.append(q)
            deep_page.append(i)
        for start in range(0, min(len(body), 12_000), 1000):
            passages.append(body[start : start + 1000])
            passage_page.append(i)
    return {
        "gold": gold,
        "texts": {
            "sts_left": left,
            "sts_right": right,
            "ki_docs": [t for _, t in docs],
            "ki_queries": [q for q, _, _ in queries],
            "passages": passages,
            "deep": deep,
        },
        "ki_want": [[d for d, _ in docs].index(want) for _, _, want in queries],
        "pages": len(pages),
        "deep_page": np.array(deep_page),
        "passage_page": np.array(passage_page),
    }


def scores(data: dict, docs: dict, queries: dict) -> tuple[float, float, float]:
    """(STS-B Spearman, known-item recall@10, man-page recall@10) with ``docs``' document vectors and
    ``queries``' query vectors (STS-B: left sentences as documents, right as queries)."""
    from scipy.stats import spearmanr

    sts = spearmanr(np.sum(docs["sts_left"] * queries["sts_right"], axis=1), data["gold"]).statistic
    top = np.argsort(-(queries["ki_queries"] @ docs["ki_docs"].T), axis=1)[:, :10]
    known = float(np.mean([w in t for w, t in zip(data["ki_want"], top, strict=True)]))
    sims = queries["deep"] @ docs["passages"].T
    best = np.full((len(sims), data["pages"]), -np.inf)
    for j, row in enumerate(sims):
        np.maximum.at(best[j], data["passage_page"], row)
    top = np.argsort(-best, axis=1)[:, :10]
    deep = float(np.mean([w in t for w, t in zip(data["deep_page"], top, strict=True)]))
    return float(sts), known, deep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--docs", type=int, default=1500, help="known-item documents")
    ap.add_argument("--pages", type=int, default=120, help="man pages")
    ap.add_argument("--engine", default="onednn", help="torch.backends.quantized.engine (onednn, fbgemm, x86)")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from embray.models.sentence_transformers import cpu_isa
    from embray.models.spec import ModelSpec, resolve_model_path

    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = args.engine
    path = resolve_model_path(ModelSpec(name="all-MiniLM-L6-v2"))
    fp32 = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    data = sets(args.docs, args.pages)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in data["texts"].items())
    print(f"CPU: {cpu_isa()}; engine {args.engine}; {args.threads} thread(s); texts: {sizes}")

    def vectors(model) -> tuple[dict, float]:
        t = time.perf_counter()
        out = {
            k: model.encode(v, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
            for k, v in data["texts"].items()
        }
        return out, time.perf_counter() - t

    base, base_s = vectors(fp32)
    head = "model | seconds | vs fp32 | cos to fp32 min / p1 / mean | docs | queries | STS-B | known items | man pages"
    print(f"\n| {head} |")
    print("| --- | ---: | ---: | --- | --- | --- | ---: | ---: | ---: |")
    row = "| {} | {:.1f} | {:.2f}x | {} | {} | {} | {:.4f} | {:.4f} | {:.4f} |"
    print(row.format("fp32", base_s, 1.0, "", "fp32", "fp32", *scores(data, base, base)))
    linear = [n for n, m in fp32.named_modules() if isinstance(m, torch.nn.Linear)]
    variants = {
        "int8 all": linear,
        "int8 no-ffn-out": [n for n in linear if not (n.endswith("output.dense") and "attention" not in n)],
    }
    for name, layers in variants.items():
        qmodel = quantize_dynamic(copy.deepcopy(fp32), {n: per_channel_dynamic_qconfig for n in layers}, torch.qint8)
        vecs, secs = vectors(qmodel)
        cos = np.concatenate([np.sum(vecs[k] * base[k], axis=1) for k in base])
        agree = f"{cos.min():.4f} / {np.percentile(cos, 1):.4f} / {cos.mean():.4f}"
        mixes = (("int8", "int8", vecs, vecs), ("int8", "fp32", vecs, base), ("fp32", "int8", base, vecs))
        for docs, queries, d, q in mixes:
            print(row.format(name, secs, base_s / secs, agree, docs, queries, *scores(data, d, q)))


if __name__ == "__main__":
    main()
