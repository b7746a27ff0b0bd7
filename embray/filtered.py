"""Filtered vector search over one HNSW graph (a part of a version): which rows a filter lets through, and
their k nearest, chosen by selectivity.

USearch's Python API (2.26) has no filtered search, so a part answers a filter one of two ways:

- **exactly**, where the matching rows are few: their vectors (read once from the index with ``get`` and
  kept with the filter's matches) are scored by brute force, so a 0.1% filter never walks the graph for
  thousands of candidates;
- **on the graph**, where they are many: it is asked for ``OVERSAMPLE x k / share`` candidates, those that
  do not match are dropped, a query left with fewer than k asks once more four times deeper, and then (rare)
  is scored exactly. Never unbounded, never a lost matching row.

The choice: exact while the matching rows are at most :data:`EXACT_PER_CANDIDATE` per graph candidate
(measured: see there). A filter's matches (per part: the mask, the matching keys and, where exact, their
vectors) are kept in a small cache per opened version (:class:`MatchCache`, bounded in bytes), because an
application asks the same filters again and again (a tenant, a language): the first query with a new
filter pays for evaluating it on every part; the next ones do not.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The graph is asked for this many times the candidates a filter's share of rows says k needs.
OVERSAMPLE = 3.0
# A part scores its matching rows exactly while they are at most this many per candidate the graph would be
# asked for: brute force over m cached rows costs about m dot products, the graph's walk over its candidates
# about candidates x (connectivity to ef-wide beams) and far worse memory access (measured at 1M rows, 8 parts:
# 12,500 matching rows per part scored exactly in ~1 ms, the graph's 316 candidates in ~3 ms).
EXACT_PER_CANDIDATE = 64
# ... and while their vectors (float32, kept with the filter's matches) take at most this much per part.
EXACT_MAX_BYTES = 32 * 1024 * 1024
# Bytes of filter matches (masks, keys, vectors) one opened version keeps for filters asked again.
CACHE_BYTES = 256 * 1024 * 1024
CACHE_ENTRIES = 256


@dataclass
class Matches:
    """The rows of one part a filter lets through: ``mask`` per row (live rows only), ``keys`` (sorted), and
    for an exact part the float32 vectors of those rows and their norms (read on first use)."""

    mask: np.ndarray
    keys: np.ndarray
    vectors: np.ndarray | None = None
    norms: np.ndarray | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.mask, self.keys, self.vectors, self.norms) if a is not None)

    def exact_vectors(self, index) -> tuple[np.ndarray, np.ndarray]:
        """The matching rows' vectors (float32, in key order) and their L2 norms, read from ``index`` once."""
        with self.lock:
            if self.vectors is None:
                got = index.get(self.keys, dtype=np.float32) if len(self.keys) else ()
                dims = index.ndim
                self.vectors = np.vstack(got).reshape(-1, dims) if len(self.keys) else np.zeros((0, dims), np.float32)
                self.norms = np.linalg.norm(self.vectors, axis=1)
            return self.vectors, self.norms


def matches(part, f) -> Matches:
    """The live rows of ``part`` (a search Part: keys, dead, kept) whose metadata matches filter ``f``."""
    from embray.storage.segments import live_mask

    mask = f.mask(part.kept) if part.kept is not None else np.zeros(len(part.keys), dtype=bool)
    if len(part.dead):
        mask &= live_mask(part.keys, part.dead)
    return Matches(mask, part.keys[mask])


def uses_graph(index, k: int, m: int) -> tuple[bool, int]:
    """(whether a part of ``len(index)`` rows answers k of its ``m`` matching rows on the graph, how many
    candidates it asks the graph for)."""
    n = len(index)
    count = min(n, int(OVERSAMPLE * k * n / max(m, 1)) + 16)
    return count * EXACT_PER_CANDIDATE < m or m * index.ndim * 4 > EXACT_MAX_BYTES, count


def search_matches(index, keys: np.ndarray, q: np.ndarray, k: int, got: Matches, exact: bool, metric: str):
    """(key, distance) of the k nearest matching rows of one part for each query row (see the module doc);
    ``keys``: the part's keys (sorted), ``metric``: the version's (distances as USearch gives them)."""
    m = len(got.keys)
    if m == 0 or k == 0:
        return [[] for _ in range(len(q))]
    graph, count = uses_graph(index, k, m)
    if not graph or (exact and m * index.ndim * 4 <= EXACT_MAX_BYTES):
        return _exact(index, q, k, got, metric)
    if exact:  # ground truth for a broad filter: the whole part by brute force, the matching rows kept
        return _exact_whole(index, keys, q, k, got)
    out: list[list[tuple[int, float]] | None] = [None] * len(q)
    todo = list(range(len(q)))
    for _ in range(2):
        found = index.search(q[todo], count)
        keys_2d, dists_2d = np.atleast_2d(found.keys), np.atleast_2d(found.distances)
        counts = np.atleast_1d(found.counts) if hasattr(found, "counts") else np.full(len(todo), len(found))
        short = []
        for j, qi in enumerate(todo):
            cand, dists = keys_2d[j][: counts[j]], dists_2d[j][: counts[j]]
            rows = np.minimum(np.searchsorted(keys, cand), len(keys) - 1)
            ok = (keys[rows] == cand) & got.mask[rows]
            out[qi] = list(zip(cand[ok][:k].tolist(), dists[ok][:k].astype(float).tolist(), strict=True))
            if len(out[qi]) < k:
                short.append(qi)
        todo = short
        if not todo or count >= len(index):
            break
        count = min(len(index), count * 4)
    if todo:
        for qi, found in zip(todo, _exact(index, q[todo], k, got, metric), strict=True):
            out[qi] = found
    return out


def _exact_whole(index, keys: np.ndarray, q: np.ndarray, k: int, got: Matches) -> list[list[tuple[int, float]]]:
    """Brute force over the whole part (USearch's exact search), asked deep enough to hold k matching rows."""
    n, count = len(index), min(len(index), max(4 * k, 64))
    while True:
        found = index.search(q, count, exact=True)
        keys_2d, dists_2d = np.atleast_2d(found.keys), np.atleast_2d(found.distances)
        out = []
        for j in range(len(q)):
            cand = keys_2d[j]
            rows = np.minimum(np.searchsorted(keys, cand), len(keys) - 1)
            ok = (keys[rows] == cand) & got.mask[rows]
            out.append(list(zip(cand[ok][:k].tolist(), dists_2d[j][ok][:k].astype(float).tolist(), strict=True)))
        if count >= n or all(len(o) >= min(k, len(got.keys)) for o in out):
            return out
        count = min(n, count * 4)


def _exact(index, q: np.ndarray, k: int, got: Matches, metric: str) -> list[list[tuple[int, float]]]:
    """Brute force over the matching rows' vectors, distances as USearch defines them for ``metric``."""
    vectors, norms = got.exact_vectors(index)
    dots = vectors @ q.T  # (m, queries)
    if metric == "cos":
        qn = np.linalg.norm(q, axis=1)
        dist = 1.0 - dots / np.maximum(norms[:, None] * qn[None, :], 1e-30)
    elif metric == "ip":
        dist = 1.0 - dots
    else:  # l2sq
        dist = (norms**2)[:, None] - 2 * dots + (np.linalg.norm(q, axis=1) ** 2)[None, :]
    take = min(k, len(got.keys))
    out = []
    for j in range(len(q)):
        col = dist[:, j]
        best = np.argpartition(col, take - 1)[:take] if take < len(col) else np.arange(len(col))
        best = best[np.lexsort((got.keys[best], col[best]))]  # (equal distances by key: a stable answer)
        out.append(list(zip(got.keys[best].tolist(), col[best].astype(float).tolist(), strict=True)))
    return out


class MatchCache:
    """Per opened version: a filter's matches on every part, kept for the filters asked most recently, up to
    ``CACHE_BYTES`` (least recently used first out). Thread-safe (a replica's pinned and shadow threads)."""

    def __init__(self, max_bytes: int = CACHE_BYTES, max_entries: int = CACHE_ENTRIES):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._entries: OrderedDict[str, list[Matches]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str, compute) -> list[Matches]:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        made = compute()
        with self._lock:
            self._entries[key] = made
            self._trim()
        return made

    def trim(self) -> None:
        """Evict down to the bounds again (after exact parts read their vectors into an entry)."""
        with self._lock:
            self._trim()

    def _trim(self) -> None:
        size = sum(m.nbytes for ms in self._entries.values() for m in ms)
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or size > self.max_bytes):
            _, gone = self._entries.popitem(last=False)
            size -= sum(m.nbytes for m in gone)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses}
