"""Filtered search over one USearch graph (embray/filtered.py), without Ray: which path a filter's share of
rows takes, that every hit matches, that the exact path is brute force's answer and the graph path close to
it, that a broad filter never keeps more vectors than its bound, and that the cache of matches is bounded."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from embray import filtered

N, D = 30_000, 32


@pytest.fixture(scope="module")
def part():
    from usearch.index import Index

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, D)).astype(np.float32)
    index = Index(ndim=D, metric="cos", dtype="f32")
    keys = np.arange(N, dtype=np.uint64) * 3  # (keys are not row numbers)
    index.add(keys, vectors)
    dead = np.sort(keys[rng.choice(N, 300, replace=False)])
    return SimpleNamespace(index=index, keys=keys, vectors=vectors, dead=dead, kept=object())


class Share:
    """A stand-in filter letting through a random ``share`` of the rows (the same rows every time)."""

    def __init__(self, share: float, seed: int = 1):
        self.rows = np.random.default_rng(seed).random(N) < share

    def mask(self, table) -> np.ndarray:
        return self.rows.copy()


def brute_force(part, q: np.ndarray, mask: np.ndarray, k: int) -> list[list[int]]:
    v = part.vectors / np.linalg.norm(part.vectors, axis=1, keepdims=True)
    sims = v @ (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    sims[~mask] = -np.inf
    return [
        part.keys[np.argsort(-sims[:, j], kind="stable")[: min(k, int(mask.sum()))]].tolist() for j in range(len(q))
    ]


@pytest.mark.parametrize(("share", "path"), [(0.001, "exact"), (0.01, "exact"), (0.1, "exact"), (0.5, "graph")])
def test_each_share_takes_its_path_and_every_hit_matches(part, share, path):
    q = np.random.default_rng(5).standard_normal((20, D)).astype(np.float32)
    f = Share(share)
    got = filtered.matches(part, f)
    live = f.rows & ~np.isin(part.keys, part.dead)
    assert np.array_equal(got.mask, live) and np.array_equal(got.keys, part.keys[live])
    graph, count = filtered.uses_graph(part.index, 10, len(got.keys))
    assert ("graph" if graph else "exact") == path and count <= N
    hits = filtered.search_matches(part.index, part.keys, q, 10, got, False, "cos")
    truth = brute_force(part, q, live, 10)
    for found, want in zip(hits, truth, strict=True):
        keys = [key for key, _ in found]
        assert set(keys) <= set(got.keys.tolist()) and len(keys) == len(want)
        assert [d for _, d in found] == sorted(d for _, d in found)
    recall = np.mean([len({k for k, _ in f_} & set(w)) / len(w) for f_, w in zip(hits, truth, strict=True)])
    assert recall == 1.0 if path == "exact" else recall >= 0.8


def test_a_broad_filter_never_keeps_more_vectors_than_its_bound(part, monkeypatch):
    monkeypatch.setattr(filtered, "EXACT_MAX_BYTES", 64 * D * 4)  # 64 rows' vectors at most
    q = np.random.default_rng(6).standard_normal((5, D)).astype(np.float32)
    f = Share(0.01)
    got = filtered.matches(part, f)
    assert filtered.uses_graph(part.index, 10, len(got.keys))[0]  # ~300 rows: over the bound, so the graph
    exact = filtered.search_matches(part.index, part.keys, q, 10, got, True, "cos")  # ground truth: whole part
    assert got.vectors is None  # nothing was kept
    assert [[k for k, _ in e] for e in exact] == brute_force(part, q, got.mask, 10)


def test_the_cache_of_matches_is_bounded_by_entries_and_bytes():
    def entry(n: int):
        return [filtered.Matches(np.zeros(n, dtype=bool), np.zeros(0, dtype=np.uint64))]

    cache = filtered.MatchCache(max_bytes=1000, max_entries=3)
    made = []
    for key in "abcd":
        cache.get(key, lambda key=key: made.append(key) or entry(100))
    assert made == ["a", "b", "c", "d"] and cache.stats()["entries"] == 3  # "a" went first
    cache.get("b", lambda: made.append("b again") or entry(100))
    assert made[-1] == "d" and cache.stats()["hits"] == 1
    cache.get("big", lambda: entry(950))  # over the byte bound with the others: the oldest go, it stays
    assert cache.stats()["entries"] == 1
    cache.clear()
    assert cache.stats()["entries"] == 0
