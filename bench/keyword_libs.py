"""bm25s (through embray.keywords) vs tantivy on one part: build, open, search and filtered-search costs.

    taskset -c 1 .venv/bin/python bench/keyword_libs.py --rows 100000 --words 100

Synthetic corpus: Zipf(1.1)-distributed words over a 50,000-word vocabulary, ``--words`` per document, plus one
identifier per document ("name_<row>"). Queries: 3 words drawn from the same distribution. Both libraries get the
same tokens (embray's tokenizer, timed separately; tantivy indexes them space-joined with its whitespace
tokenizer) and the same BM25 parameters (k1 = 1.2, b = 0.75), so the top-10 lists can be compared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from embray.keywords import KeywordIndex, build_keyword_index, tokenize


def corpus(rows: int, words: int, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    p /= p.sum()
    draw = rng.choice(len(vocab), size=(rows, words), p=p)
    texts = [" ".join(vocab[r]) + f" name_{i}" for i, r in enumerate(draw)]
    queries = [" ".join(vocab[rng.choice(len(vocab), size=3, p=p)]) for _ in range(200)]
    return texts, queries


def dir_size(path: str) -> tuple[int, int]:
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    return sum(os.path.getsize(f) for f in files), len(files)


def bench_bm25s(keys, texts, queries, allowed, tmp):
    path = os.path.join(tmp, "kw.bin")
    t = time.perf_counter()
    build_keyword_index(keys, texts, path)
    build = time.perf_counter() - t
    t = time.perf_counter()
    ki = KeywordIndex.open(path)
    opened = time.perf_counter() - t
    ki.search(queries[:5], 10)
    t = time.perf_counter()
    res = ki.search(queries, 10)
    search = (time.perf_counter() - t) / len(queries)
    t = time.perf_counter()
    fres = ki.search(queries, 10, allowed=allowed)
    fsearch = (time.perf_counter() - t) / len(queries)
    return (
        dict(
            build=build,
            open=opened,
            search_ms=search * 1e3,
            filtered_ms=fsearch * 1e3,
            size=os.path.getsize(path),
            files=1,
        ),
        res,
        fres,
    )


def bench_tantivy(keys, token_texts, queries, allowed, tmp):
    import tantivy

    sb = tantivy.SchemaBuilder()
    sb.add_unsigned_field("key", stored=True, indexed=True, fast=True)
    sb.add_text_field("text", tokenizer_name="whitespace", index_option="freq")
    schema = sb.build()
    d = os.path.join(tmp, "tantivy")
    os.makedirs(d)
    t = time.perf_counter()
    index = tantivy.Index(schema, path=d)
    w = index.writer(heap_size=200_000_000, num_threads=1)
    for k, text in zip(keys.tolist(), token_texts, strict=True):
        doc = tantivy.Document()
        doc.add_unsigned("key", k)
        doc.add_text("text", text)
        w.add_document(doc)
    w.commit()
    w.wait_merging_threads()
    build = time.perf_counter() - t
    t = time.perf_counter()
    index = tantivy.Index.open(d)
    index.reload()
    searcher = index.searcher()
    opened = time.perf_counter() - t

    def query(q, filt=None):
        terms = [
            (tantivy.Occur.Should, tantivy.Query.term_query(schema, "text", tok)) for tok in dict.fromkeys(tokenize(q))
        ]
        bq = tantivy.Query.boolean_query(terms)
        if filt is not None:  # exact: a term-set filter on the key, scored 0 so BM25 is unchanged
            f = tantivy.Query.const_score_query(tantivy.Query.term_set_query(schema, "key", filt), 0.0)
            bq = tantivy.Query.boolean_query([(tantivy.Occur.Must, bq), (tantivy.Occur.Must, f)])
        hits = searcher.search(bq, 10).hits
        return [(searcher.doc(a)["key"][0], s) for s, a in hits]

    t = time.perf_counter()
    res = [query(q) for q in queries]
    search = (time.perf_counter() - t) / len(queries)
    t = time.perf_counter()
    allowed_list = allowed.tolist()
    fres = [query(q, allowed_list) for q in queries]
    fsearch = (time.perf_counter() - t) / len(queries)
    size, files = dir_size(d)
    return (
        dict(build=build, open=opened, search_ms=search * 1e3, filtered_ms=fsearch * 1e3, size=size, files=files),
        res,
        fres,
    )


def overlap(a, b):
    return np.mean([len({k for k, _ in x} & {k for k, _ in y}) / max(1, len(x)) for x, y in zip(a, b, strict=True)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--words", type=int, default=100)
    ap.add_argument("--allowed", type=int, default=500)
    args = ap.parse_args()
    texts, queries = corpus(args.rows, args.words, 0)
    keys = np.arange(1, args.rows + 1, dtype=np.uint64) * 3
    allowed = np.sort(np.random.default_rng(1).choice(keys, size=args.allowed, replace=False))
    t = time.perf_counter()
    token_texts = [" ".join(tokenize(x)) for x in texts]
    print(f"tokenize {args.rows} docs: {time.perf_counter() - t:.2f} s")
    tmp = tempfile.mkdtemp()
    try:
        b, bres, bf = bench_bm25s(keys, texts, queries, allowed, tmp)
        print("bm25s  ", {k: round(v, 3) for k, v in b.items()}, "(build includes tokenizing)")
        tv, tres, tf = bench_tantivy(keys, token_texts, queries, allowed, tmp)
        print("tantivy", {k: round(v, 3) for k, v in tv.items()}, "(build excludes tokenizing)")
        print(f"top-10 overlap bm25s vs tantivy: {overlap(bres, tres):.3f}; filtered: {overlap(bf, tf):.3f}")
        print(
            f"filtered hits per query: bm25s {np.mean([len(x) for x in bf]):.2f}, "
            f"tantivy {np.mean([len(x) for x in tf]):.2f}"
        )
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
