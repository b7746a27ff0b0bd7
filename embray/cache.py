"""The one cache of opened versions, used by :class:`embray.Collection`, the Serve ingress (pinned versions)
and the shard groups: least recently used first, some never evicted, one load per version at a time.

Letting a version go only drops the cache's reference: a request that is still answering from it holds its
own, and the version's memory-maps close when the last holder lets go (Python's reference count), so an
eviction never fails a request in flight.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class VersionCache(Generic[T]):
    """Opened versions by id, at most ``capacity`` of them beyond those ``keep()`` names (never evicted).

    ``get`` marks a version as just used; ``open`` returns it, loading it with ``load()`` when it is not
    held (one load at a time, so two callers never load the same version twice, while ``get`` of the held
    ones goes on); ``drop_idle`` lets go of versions not used for a while.
    """

    def __init__(
        self,
        capacity: int,
        keep: Callable[[], Iterable[str | None]] = tuple,
        on_evict: Callable[[str], None] | None = None,
    ):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._keep = keep
        self._on_evict = on_evict  # told each id evicted for capacity (e.g. to log it), outside the lock
        self._held: OrderedDict[str, tuple[T, float]] = OrderedDict()  # id -> (version, last used)
        self._lock = threading.Lock()  # guards _held; never held while loading
        self._loading = threading.Lock()  # one load at a time

    def get(self, vid: str) -> T | None:
        """The held version ``vid`` (now the most recently used), or None."""
        with self._lock:
            got = self._held.get(vid)
            if got is None:
                return None
            self._held[vid] = (got[0], time.monotonic())
            self._held.move_to_end(vid)
            return got[0]

    def open(self, vid: str, load: Callable[[], T]) -> T:
        """The version ``vid``: held, or loaded now with ``load()`` (whose errors pass through, caching
        nothing); evicts the least recently used beyond ``capacity``."""
        got = self.get(vid)
        if got is not None:
            return got
        with self._loading:
            got = self.get(vid)  # loaded by the caller we waited for
            if got is not None:
                return got
            value = load()
            with self._lock:
                self._held[vid] = (value, time.monotonic())
                evicted = self._evict()
        for old in evicted:
            if self._on_evict is not None:
                self._on_evict(old)
        return value

    def ids(self) -> list[str]:
        """The held versions, least recently used first."""
        with self._lock:
            return list(self._held)

    def newest(self) -> T | None:
        """The most recently used version (a new one may share its encoder), or None."""
        with self._lock:
            return next(reversed(self._held.values()), (None, 0.0))[0]

    def drop_idle(self, idle_s: float) -> list[str]:
        """Let go of the versions not used for ``idle_s`` seconds (never those ``keep()`` names); their ids."""
        now = time.monotonic()
        kept = set(self._keep())
        with self._lock:
            idle = [v for v, (_, used) in self._held.items() if v not in kept and now - used > idle_s]
            for v in idle:
                del self._held[v]
        return idle

    def _evict(self) -> list[str]:
        """(Lock held.) Least recently used first, skipping the kept ones, down to ``capacity``; the ids."""
        kept = set(self._keep())
        out = []
        while len(self._held) > self.capacity:
            old = next((v for v in self._held if v not in kept), None)
            if old is None:
                break
            del self._held[old]
            out.append(old)
        return out
