"""Speed and validity of each chunker on the man-page corpus (build_corpus.py).

Usage: RAYON_NUM_THREADS=1 python bench.py /tmp/chunkinv/corpus.jsonl [name-substring ...]
Per chunker: one warm-up doc, then all docs timed in one process (chunking only, validation afterwards).
Checks per chunk: library text == text[start:end] ("span ok"); tokens with [CLS]/[SEP] <= 256;
determinism: a second run over the first 20 docs gives identical (start, end, text) lists;
coverage: non-whitespace characters of the document not inside any chunk.
"""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chunkers as C

path = sys.argv[1]
only = sys.argv[2:]
docs = [json.loads(line) for line in open(path)]
tok = C.load_tokenizer()
chars = sum(len(d["text"]) for d in docs)
ntok = sum(len(tok.encode(d["text"], add_special_tokens=False).ids) for d in docs)
print(f"docs={len(docs)} chars_mean={chars / len(docs):.0f} content_tokens_mean={ntok / len(docs):.0f}", flush=True)
rows = []
for name, fn in C.all_chunkers(tok).items():
    if only and not any(o in name for o in only):
        continue
    fn(docs[0]["text"])  # warm-up
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = [fn(d["text"]) for d in docs]
    dt = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_chunks = bad_span = over = 0
    max_tok = 0
    tok_sum = 0
    uncovered = 0
    for d, spans in zip(docs, out, strict=False):
        t = d["text"]
        covered = bytearray(len(t))
        for s, e, c in spans:
            n_chunks += 1
            if t[s:e] != c:
                bad_span += 1
            k = len(tok.encode(c).ids)  # with [CLS] and [SEP]
            tok_sum += k
            max_tok = max(max_tok, k)
            if k > C.MAX_WITH_SPECIALS:
                over += 1
            covered[s:e] = b"\1" * (e - s)
        uncovered += sum(1 for i, ch in enumerate(t) if not covered[i] and not ch.isspace())
    again = [fn(d["text"]) for d in docs[:20]]
    det = all(a == b for a, b in zip(again, out[:20], strict=False))
    row = dict(
        name=name,
        seconds=round(dt, 2),
        docs_per_s=round(len(docs) / dt, 1),
        chunks_per_doc=round(n_chunks / len(docs), 1),
        mean_tokens_with_specials=round(tok_sum / n_chunks, 1),
        max_tokens_with_specials=max_tok,
        chunks_over_256=over,
        span_mismatches=bad_span,
        uncovered_nonspace_chars=uncovered,
        deterministic_rerun=det,
        maxrss_growth_mb=round((rss1 - rss0) / 1024, 1),
    )
    if name.startswith("semchunk"):
        import semchunk.semchunk as S

        row["semchunk_memo_entries"] = sum(f.cache_info().currsize for f in S._memoized_token_counters.values())
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump(rows, open(os.environ.get("BENCH_OUT", "/tmp/chunkinv/bench.json"), "w"), indent=1)
