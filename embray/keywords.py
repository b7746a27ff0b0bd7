"""Keyword (BM25) search over one part's texts, and reciprocal rank fusion for hybrid search.

Library: bm25s (pure Python + NumPy, ~0.6 MB installed) computes the BM25 weights at build time
(Lucene variant: idf = ln(1 + (N - df + 0.5) / (df + 0.5)), tf part = tf / (tf + k1 (1 - b + b dl / avgdl)),
k1 = 1.2, b = 0.75, the Lucene / tantivy defaults) into a term-major sparse matrix: one posting list per
term of (row, weight). A query's score for a row is the sum of its distinct terms' weights. We chose it over
tantivy (17 MB native wheel, a directory of segment files, deletes and filters through its own writer and
query language) because the index is three flat arrays that we store in one file and memory-map, and a
filter to an ``allowed`` key set is exact by construction: the rows in the set are scored directly (one
binary search per row and term in the term's sorted posting list), so a small set never loses a matching
row to oversampling. See docs/notes/issue28-keywords.md for the measurements.

Corpus statistics (N, df, avgdl) are those of the whole part: ``allowed`` and ``dead`` restrict which rows
may be hits, never the scores (as a Lucene filter does). Tombstoned rows therefore still count in df
until a compaction rebuilds the part, the usual behaviour of segment-based engines.

File format (one file, no pickle): ``EMBRAYKW`` magic, format version (uint32), header length (uint64), a
JSON header naming each array's dtype, shape and offset, then the arrays, 64-byte aligned, little-endian.
Arrays: ``keys`` (uint64, per row), ``key_order`` (argsort of keys), ``indptr`` (int64, per term + 1),
``rows`` (int32, posting rows, ascending within a term), ``weights`` (float32), and the vocabulary as
``vocab_offsets`` (int64) into ``vocab_blob`` (UTF-8 bytes), terms sorted bytewise (a term's id is its
position, found by binary search: opening reads nothing but the header).
"""

from __future__ import annotations

import bisect
import gc
import json
import os
import re
import struct
import unicodedata
from collections.abc import Hashable, Sequence

import numpy as np

__all__ = [
    "build_keyword_index",
    "KeywordIndex",
    "tokenize",
    "fuse_rrf",
    "fuse_hybrid",
    "K1",
    "B",
    "RRF_K0",
    "HYBRID_WEIGHTS",
    "HYBRID_DEPTH",
]

K1 = 1.2
B = 0.75
# Hybrid defaults, chosen on bench/known_items.py (docs/notes/issue28-keywords.md): equal weights with k0 = 60
# (the RRF paper's) lost 10 points of recall@10 to keyword-only on identifier and phrase queries; k0 = 10 with
# the keyword list weighted 3x matched or beat the better of the two on both seeds, at every depth from 10 to 100.
RRF_K0 = 10
HYBRID_WEIGHTS = (1.0, 3.0)  # (vector, keyword)
HYBRID_DEPTH = 50  # how many hits each side contributes before fusion
MAGIC = b"EMBRAYKW"
FORMAT_VERSION = 1
_ALIGN = 64
_ARRAYS = ("keys", "key_order", "indptr", "rows", "weights", "vocab_offsets", "vocab_blob")

# -- tokenizer ------------------------------------------------------------------------------------------------

# A compound: word runs joined by connector punctuation with no space between ("os.path.join", "Vec::retain",
# "utf-8", "HTTP/2", "user@host", "don't"). \w is Unicode-aware; combining marks (Mn/Mc, e.g. Devanagari vowel
# signs) are not \w in Python's re, so the common combining blocks are added to keep such words whole.
_W = r"[\w\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a\u064b-\u065f\u0900-\u0963\u0966-\u0dff\u0e31-\u0e4e\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]"  # noqa: E501
_COMPOUND = re.compile(rf"{_W}+(?:[.:/\-@'\u2019#+]+{_W}+)*")
_PIECES = re.compile(rf"(?:(?!_){_W})+")  # a compound's parts: split at connectors and underscores
# camelCase boundaries: "getHTTPResponse" -> get, HTTP, Response; "x86" stays whole (no letter/digit split)
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+\d*|[A-Z]+\d*|\d+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def _parts(word: str) -> list[str]:
    """The lowercased parts of a compound: pieces between connectors/underscores, camelCase pieces of those."""
    out: list[str] = []
    for piece in _PIECES.findall(word):
        if piece.isascii() and not (piece.islower() or piece.isupper() or piece.istitle() or piece.isdigit()):
            sub = _CAMEL.findall(piece)
            if len(sub) > 1:
                out.extend(s.casefold() for s in sub)
        out.append(piece.casefold())
    return out


def _cjk_bigrams(word: str) -> list[str]:
    """Character bigrams of a run written without spaces (Han, kana, Hangul): the usual CJK fallback."""
    return [word[i : i + 2] for i in range(len(word) - 1)] if len(word) > 2 else []


def tokenize(text: str) -> list[str]:
    """The one tokenizer for documents and queries.

    NFKC-normalised, casefolded. Each compound ("Vec::retain", "ERR_CONN_RESET", "os.path.join", "utf-8",
    "x86_64", "HTTP/2") is emitted whole AND as its parts (split at connectors and underscores; ASCII camelCase
    pieces too: "getElementById" also gives get, element, by, id), so a query for a part finds the compound and a
    query for the compound ranks it first (it matches the rare whole token as well as the parts). Runs of CJK
    characters also give their character bigrams. No stemming ("retained" does not match "retain"), no stop
    words (BM25's idf already gives "the" almost no weight, and phrases and identifiers such as "is" or "in"
    stay findable). Only pure punctuation is dropped.
    """
    text = unicodedata.normalize("NFKC", text)
    has_cjk = _CJK.search(text) is not None
    out: list[str] = []
    for word in _COMPOUND.findall(text):
        whole = word.casefold()
        out.append(whole)
        if not word.isalnum() or not (word.islower() or word.isupper() or word.istitle()):
            parts = _parts(word)
            if len(parts) > 1 or (parts and parts[0] != whole):
                out.extend(p for p in dict.fromkeys(parts) if p != whole)
        if has_cjk and _CJK.search(word):
            out.extend(_cjk_bigrams(whole))
    return out


# -- build ----------------------------------------------------------------------------------------------------


class _Docs(Sequence):
    """Each document's term ids, kept as compact int32 arrays and handed to bm25s as lists one at a time
    (a list of Python strings or ints per token would take ~1 GB for 100k documents of 100 words)."""

    def __init__(self, docs: list[np.ndarray], remap: np.ndarray):
        self._docs, self._remap = docs, remap

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i):
        return self._remap[self._docs[i]].tolist()

    def __iter__(self):
        return (self._remap[d].tolist() for d in self._docs)


def _bm25_postings(docs: _Docs, n_terms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, rows, weights) of the term-major BM25 weight matrix, computed by bm25s."""
    import bm25s

    model = bm25s.BM25(k1=K1, b=B, method="lucene", dtype="float32", int_dtype="int32", backend="numpy")
    scores = model.build_index_from_ids(list(range(n_terms)), docs, show_progress=False)
    indptr = np.asarray(scores["indptr"], dtype=np.int64)
    if len(indptr) != n_terms + 1 or scores["num_docs"] != len(docs):
        raise RuntimeError("bm25s returned a matrix of an unexpected shape")
    return indptr, np.asarray(scores["indices"], dtype=np.int32), np.asarray(scores["data"], dtype=np.float32)


def _term_ids(texts: Sequence[str]) -> tuple[list[str], _Docs]:
    """The sorted vocabulary (code point order = UTF-8 byte order) and each text's term ids into it."""
    ids: dict[str, int] = {}
    docs = []
    for text in texts:  # ids in order of first sight, remapped to sorted order below
        toks = tokenize(text)
        docs.append(np.fromiter((ids.setdefault(t, len(ids)) for t in toks), dtype=np.int32, count=len(toks)))
    terms = list(ids)
    order = sorted(range(len(terms)), key=terms.__getitem__)
    remap = np.empty(len(terms), dtype=np.int32)
    remap[np.asarray(order, dtype=np.int64)] = np.arange(len(terms), dtype=np.int32)
    return [terms[i] for i in order], _Docs(docs, remap)


def build_keyword_index(keys: np.ndarray, texts: Sequence[str], path: str) -> None:
    """Write the BM25 index of ``texts`` (row i has key ``keys[i]``) to the single file ``path``."""
    keys = np.ascontiguousarray(np.asarray(keys, dtype=np.uint64).reshape(-1))
    if len(keys) != len(texts):
        raise ValueError(f"{len(keys)} keys for {len(texts)} texts")
    if len(np.unique(keys)) != len(keys):
        raise ValueError("keys must be unique")
    collecting = gc.isenabled()
    gc.disable()  # millions of short-lived lists: the cyclic collector would only add time
    try:
        terms, docs = _term_ids(texts)
        if terms:
            indptr, rows, weights = _bm25_postings(docs, len(terms))
        else:
            indptr, rows, weights = np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
    finally:
        if collecting:
            gc.enable()
    vocab = [t.encode("utf-8") for t in terms]
    lengths = np.fromiter((len(v) for v in vocab), dtype=np.int64, count=len(vocab))
    offsets = np.zeros(len(vocab) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    arrays = {
        "keys": keys,
        "key_order": np.argsort(keys, kind="stable").astype(np.int64),
        "indptr": indptr,
        "rows": rows,
        "weights": weights,
        "vocab_offsets": offsets,
        "vocab_blob": np.frombuffer(b"".join(vocab), dtype=np.uint8),
    }
    _write(path, arrays, {"k1": K1, "b": B, "method": "lucene", "tokenizer": 1, "rows": len(keys)})


def _write(path: str, arrays: dict[str, np.ndarray], params: dict) -> None:
    entries, offset = {}, 0
    for name in _ARRAYS:
        a = arrays[name]
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        entries[name] = {"dtype": dt.str, "shape": list(a.shape), "offset": offset}
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    header = json.dumps({"params": params, "arrays": entries}, sort_keys=True).encode()
    start = -(-(len(MAGIC) + 12 + len(header)) // _ALIGN) * _ALIGN
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<IQ", FORMAT_VERSION, len(header)) + header)
        for name in _ARRAYS:
            f.seek(start + entries[name]["offset"])
            f.write(np.ascontiguousarray(arrays[name], dtype=entries[name]["dtype"]).tobytes())
        f.truncate(start + offset)
    os.replace(tmp, path)


# -- search ---------------------------------------------------------------------------------------------------


def _member(sorted_set: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values[i] in sorted_set, elementwise (sorted_set ascending)."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_set, values)
    np.minimum(pos, len(sorted_set) - 1, out=pos)
    return sorted_set[pos] == values


def _as_keys(a) -> np.ndarray | None:
    if a is None:
        return None
    a = np.asarray(a, dtype=np.uint64).reshape(-1)
    if len(a) > 1 and np.any(a[1:] < a[:-1]):
        raise ValueError("allowed and dead must be sorted ascending")
    return a


class KeywordIndex:
    """One part's BM25 index, memory-mapped from the file ``build_keyword_index`` wrote."""

    # strategy thresholds (results are identical either way; tests move them to cover every path)
    dense_ratio = 8  # accumulate into a dense per-row array when postings * dense_ratio > rows
    row_ratio = 4  # score the allowed rows directly when len(allowed) * terms * row_ratio < postings

    def __init__(self, arrays: dict[str, np.ndarray], params: dict, path: str | None = None):
        self._a = arrays
        self.params = params
        self.path = path
        self._keys = arrays["keys"]
        self._sorted_keys = self._keys[arrays["key_order"]] if len(self._keys) else self._keys
        self._vocab_size = len(arrays["vocab_offsets"]) - 1
        self._blob = arrays["vocab_blob"]

    @classmethod
    def open(cls, path: str, *, mmap: bool = True) -> KeywordIndex:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 12)
            if len(head) < len(MAGIC) + 12 or head[: len(MAGIC)] != MAGIC:
                raise ValueError(f"{path} is not an embray keyword index")
            version, hlen = struct.unpack("<IQ", head[len(MAGIC) :])
            if version != FORMAT_VERSION:
                raise ValueError(f"{path}: keyword index format {version}, this embray reads {FORMAT_VERSION}")
            header = json.loads(f.read(hlen))
        start = -(-(len(MAGIC) + 12 + hlen) // _ALIGN) * _ALIGN
        size = os.path.getsize(path)
        arrays = {}
        for name in _ARRAYS:
            e = header["arrays"][name]
            dt, shape = np.dtype(e["dtype"]), tuple(e["shape"])
            count = int(np.prod(shape))
            if start + e["offset"] + count * dt.itemsize > size:
                raise ValueError(f"{path} is truncated ({name})")
            if mmap and count:
                arrays[name] = np.memmap(path, dtype=dt, mode="r", offset=start + e["offset"], shape=shape)
            else:
                arrays[name] = np.fromfile(path, dtype=dt, count=count, offset=start + e["offset"]).reshape(shape)
        return cls(arrays, header["params"], path)

    def __reduce__(self):  # ships the arrays (memmaps become plain arrays), never code
        return (KeywordIndex, ({n: np.asarray(self._a[n]) for n in _ARRAYS}, self.params, self.path))

    def __len__(self) -> int:
        return len(self._keys)

    def _term(self, term: str) -> int | None:
        """The id of ``term``: binary search over the sorted vocabulary; None when absent."""
        t = term.encode("utf-8")
        off, blob = self._a["vocab_offsets"], self._blob

        def at(i: int) -> bytes:
            return bytes(blob[off[i] : off[i + 1]])

        i = bisect.bisect_left(range(self._vocab_size), t, key=at)
        return i if i < self._vocab_size and at(i) == t else None

    def term_ids(self, query: str) -> list[int]:
        """The ids of the query's distinct known terms (a term repeated in the query counts once)."""
        ids = (self._term(t) for t in dict.fromkeys(tokenize(query)))
        return [i for i in ids if i is not None]

    def _score_rows(self, terms: list[int], rows: np.ndarray) -> np.ndarray:
        """BM25 scores of the given rows (ascending), scored directly: exact for any subset."""
        indptr, post, w = self._a["indptr"], self._a["rows"], self._a["weights"]
        scores = np.zeros(len(rows), dtype=np.float64)
        for t in terms:
            lo, hi = int(indptr[t]), int(indptr[t + 1])
            plist = post[lo:hi]
            pos = np.searchsorted(plist, rows)
            hit = pos < len(plist)
            hit[hit] = plist[pos[hit]] == rows[hit]
            scores[hit] += w[lo:hi][pos[hit]]
        return scores

    def _score_all(self, terms: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of every row holding at least one term."""
        indptr, post, w = self._a["indptr"], self._a["rows"], self._a["weights"]
        spans = [(int(indptr[t]), int(indptr[t + 1])) for t in terms]
        if sum(hi - lo for lo, hi in spans) * self.dense_ratio > len(self):
            dense = np.zeros(len(self), dtype=np.float64)
            for lo, hi in spans:  # term by term, in the same order as _score_rows: identical sums
                dense[post[lo:hi]] += w[lo:hi]
            hits = np.flatnonzero(dense > 0)
            return hits, dense[hits]
        rows = np.concatenate([post[lo:hi] for lo, hi in spans])
        weights = np.concatenate([w[lo:hi] for lo, hi in spans]).astype(np.float64)
        uniq, inv = np.unique(rows, return_inverse=True)
        scores = np.zeros(len(uniq), dtype=np.float64)
        np.add.at(scores, inv, weights)  # in posting order, i.e. term by term: identical sums
        return uniq, scores

    def _rows_of(self, keys: np.ndarray) -> np.ndarray:
        """Rows (ascending) holding any of ``keys``; keys not in this part are ignored."""
        sk = self._sorted_keys
        pos = np.searchsorted(sk, keys)
        valid = pos < len(sk)
        pos = pos[valid]
        pos = pos[sk[pos] == keys[valid]]
        return np.sort(np.asarray(self._a["key_order"])[pos])

    def _search_one(self, query: str, k: int, allowed: np.ndarray | None, dead: np.ndarray | None):
        terms = self.term_ids(query)
        if not terms or k <= 0 or len(self) == 0:
            return []
        postings = sum(int(self._a["indptr"][t + 1] - self._a["indptr"][t]) for t in terms)
        if allowed is not None and len(allowed) * len(terms) * self.row_ratio < postings:
            rows = self._rows_of(allowed)  # few allowed rows: score just them
            scores = self._score_rows(terms, rows)
            keep = scores > 0
            rows, scores = rows[keep], scores[keep]
        else:
            rows, scores = self._score_all(terms)
            if allowed is not None:
                keep = _member(allowed, self._keys[rows])
                rows, scores = rows[keep], scores[keep]
        keys = self._keys[rows]
        if dead is not None and len(dead):
            keep = ~_member(dead, keys)
            keys, scores = keys[keep], scores[keep]
        if len(scores) > k:  # keep every row tied with the k-th score, then order exactly
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            keep = scores >= kth
            keys, scores = keys[keep], scores[keep]
        order = np.lexsort((keys, -scores))[:k]
        return [(int(keys[i]), float(scores[i])) for i in order]

    def search(self, queries: list[str], k: int, *, allowed=None, dead=None) -> list[list[tuple[int, float]]]:
        """Per query, up to ``k`` (key, BM25 score) best first, ties by key ascending.

        ``allowed``: sorted uint64 keys a hit must be among (exact: every allowed row is considered, however few);
        ``dead``: sorted uint64 keys never returned. Rows matching no query term (score 0) are never hits.
        """
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings")
        allowed, dead = _as_keys(allowed), _as_keys(dead)
        return [self._search_one(q, int(k), allowed, dead) for q in queries]


# -- fusion ---------------------------------------------------------------------------------------------------


def fuse_rrf(
    rankings: list[list[Hashable]], weights: list[float] | None = None, k0: int = RRF_K0, limit: int | None = None
) -> list[tuple[Hashable, float]]:
    """Reciprocal rank fusion: score(d) = sum_i w_i / (k0 + rank_i(d)), ranks from 1.

    Best first, ties by ``str(id)``. An id repeated within one ranking counts at its best rank only.
    """
    if weights is None:
        weights = [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    if k0 < 0:
        raise ValueError("k0 must be >= 0")
    fused: dict[Hashable, float] = {}
    for ranking, w in zip(rankings, weights, strict=True):
        seen = set()
        for rank, d in enumerate(ranking, start=1):
            if d in seen:
                continue
            seen.add(d)
            fused[d] = fused.get(d, 0.0) + w / (k0 + rank)
    out = sorted(fused.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return out if limit is None else out[:limit]


def fuse_hybrid(
    vector: list[Hashable], keyword: list[Hashable], limit: int | None = None
) -> list[tuple[Hashable, float]]:
    """Hybrid ranking with the shipped defaults: RRF of the top HYBRID_DEPTH of each list, HYBRID_WEIGHTS, RRF_K0."""
    return fuse_rrf(
        [list(vector)[:HYBRID_DEPTH], list(keyword)[:HYBRID_DEPTH]],
        weights=list(HYBRID_WEIGHTS),
        k0=RRF_K0,
        limit=limit,
    )
