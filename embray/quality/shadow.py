"""Shadow traffic: how the ``candidate`` version answers the live text queries the active one answered.

Each Serve replica with ``serve.shadow.fraction`` > 0 sends that share of its text queries, after answering
them, also to the candidate, and keeps per candidate the number of queries, their overlap@10 with the active
answer and the candidate's latencies (:class:`ShadowRecorder`). It writes them to
``<collection>/_status/shadow/<candidate>/<replica>.json``; :func:`read_shadow` adds up every replica's file
for ``embray status`` and the promotion gate ``monitor.shadow_min_overlap``.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from typing import Any

import numpy as np

from embray.lifecycle.versions import utcnow
from embray.results import ShadowStats
from embray.storage import layout
from embray.storage.store import Store

LATENCIES_KEPT = 2000  # per candidate and replica: the newest, for p50 / p99


def overlap_at_10(active_ids: list[Any], candidate_ids: list[Any]) -> float:
    """Share of the active answer's top-10 ids that the candidate's top 10 also holds."""
    want = active_ids[:10]
    return len(set(want) & set(candidate_ids[:10])) / len(want) if want else 1.0


class ShadowRecorder:
    """One replica's shadow numbers per candidate (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by: dict[str, dict[str, Any]] = {}
        self._written: dict[str, int] = {}  # candidate -> queries when last written

    def add(self, candidate: str, overlap: float, ms: float) -> None:
        with self._lock:
            s = self._by.setdefault(candidate, {"queries": 0, "overlap_sum": 0.0, "ms": deque(maxlen=LATENCIES_KEPT)})
            s["queries"] += 1
            s["overlap_sum"] += overlap
            s["ms"].append(ms)

    def mean_overlap(self, candidate: str) -> float:
        with self._lock:
            s = self._by.get(candidate)
            return s["overlap_sum"] / s["queries"] if s else 0.0

    def write(self, store: Store, collection: str, replica: str) -> None:
        """Write each candidate's numbers that changed since the last write."""
        with self._lock:
            todo = {
                c: {"candidate": c, "queries": s["queries"], "overlap_sum": s["overlap_sum"], "ms": list(s["ms"])}
                for c, s in self._by.items()
                if self._written.get(c) != s["queries"]
            }
        for c, snap in todo.items():
            snap["updated_at"] = utcnow()
            store.write_bytes(f"{layout.shadow_dir(collection, c)}/{replica}.json", json.dumps(snap).encode())
            self._written[c] = snap["queries"]


def read_shadow(store: Store, collection: str, candidate: str) -> ShadowStats | None:
    """Every replica's shadow numbers for ``candidate``, added up (None: no shadow query reached it)."""
    d = layout.shadow_dir(collection, candidate)
    snaps = []
    for name in store.listdir(d):
        if name.endswith(".json") and not name.startswith("."):
            try:
                snaps.append(json.loads(store.read_bytes(f"{d}/{name}")))
            except (FileNotFoundError, ValueError):
                continue  # a replica's file being replaced, or gone with its version
    queries = sum(s["queries"] for s in snaps)
    if not queries:
        return None
    ms = np.array([m for s in snaps for m in s["ms"]] or [0.0])
    return ShadowStats(
        candidate=candidate,
        queries=queries,
        overlap_at_10=round(sum(s["overlap_sum"] for s in snaps) / queries, 4),
        p50_ms=round(float(np.percentile(ms, 50)), 2),
        p99_ms=round(float(np.percentile(ms, 99)), 2),
        replicas=len(snaps),
        updated_at=max(s["updated_at"] for s in snaps),
    )
