"""VersionCache, the one cache of opened versions (Collection, the Serve ingress's pinned versions, shard groups)."""

from __future__ import annotations

import threading
import time

import pytest

from embray.cache import VersionCache


def test_least_recently_used_goes_first_and_the_kept_ones_never():
    kept: set[str] = {"a"}
    evicted: list[str] = []
    c: VersionCache[str] = VersionCache(2, keep=lambda: kept, on_evict=evicted.append)
    for v in "abc":
        c.open(v, lambda v=v: v.upper())
    # "a" is kept: the least recently used one that is not kept goes instead
    assert c.ids() == ["a", "c"] and evicted == ["b"]
    assert c.get("a") == "A" and c.ids() == ["c", "a"]  # get marks it as just used
    c.open("d", lambda: "D")
    assert c.ids() == ["a", "d"] and evicted == ["b", "c"]
    kept.clear()
    c.open("e", lambda: "E")
    assert c.ids() == ["d", "e"] and evicted[-1] == "a"
    assert c.newest() == "E"


def test_all_kept_may_exceed_capacity_and_capacity_zero_still_answers():
    c: VersionCache[int] = VersionCache(1, keep=lambda: {"x", "y"})
    c.open("x", lambda: 1)
    c.open("y", lambda: 2)
    assert c.ids() == ["x", "y"]  # both kept: neither is let go
    z: VersionCache[int] = VersionCache(0)
    assert z.open("v", lambda: 7) == 7 and z.ids() == []  # loaded for the caller, held by nobody


def test_a_version_is_loaded_once_however_many_ask_at_once():
    loads = []
    gate = threading.Event()

    def load():
        loads.append(1)
        gate.wait(5)
        return object()

    c: VersionCache[object] = VersionCache(3)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(c.open("v", load))) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(5)
    assert len(loads) == 1 and len(got) == 8 and all(g is got[0] for g in got)


def test_a_failed_load_caches_nothing_and_the_next_caller_tries_again():
    c: VersionCache[str] = VersionCache(2)

    def broken():
        raise FileNotFoundError("collected")

    with pytest.raises(FileNotFoundError):
        c.open("v", broken)
    assert c.ids() == [] and c.get("v") is None
    assert c.open("v", lambda: "V") == "V"


def test_idle_versions_are_let_go_but_not_the_kept_ones():
    c: VersionCache[str] = VersionCache(5, keep=lambda: {"k"})
    for v in ("k", "old"):
        c.open(v, lambda v=v: v)
    time.sleep(0.15)
    c.open("fresh", lambda: "fresh")
    assert c.drop_idle(0.1) == ["old"]
    assert c.ids() == ["k", "fresh"]


def test_an_evicted_version_stays_usable_by_whoever_holds_it():
    c: VersionCache[list] = VersionCache(1)
    held = c.open("v1", lambda: [1, 2, 3])
    c.open("v2", lambda: [4])
    assert c.get("v1") is None and held == [1, 2, 3]  # a request in flight keeps its reference


def test_capacity_must_not_be_negative():
    with pytest.raises(ValueError, match="capacity"):
        VersionCache(-1)
