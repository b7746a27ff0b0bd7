"""Which versions an ingress replica answers from: the one alias `active` names (switched by :meth:`check`,
called by the alias watcher, :func:`embray.serving.watch.poll_loop`), and the versions queries pin.

A switch loads and warms the new version beside the old one, then swaps one reference (:attr:`current`); a
request reads that reference once, so it is answered wholly from one version, and the old version is let go
when the last request holding it finishes. With shard groups the switch is two-phase: the ingress moves only
once every live group replica reports the new version loaded. Pinned versions live in a
:class:`embray.cache.VersionCache` of ``serve.max_loaded_versions - 1`` (the active one is the last place).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

from embray.cache import VersionCache
from embray.collection import Collection
from embray.errors import EmbrayError, VersionError
from embray.lifecycle.registry import ACTIVE
from embray.lifecycle.versions import is_version_id, read_manifest, utcnow
from embray.search import VersionIndex
from embray.serving.groups import Liveness, not_ready
from embray.serving.metrics import ServeMetrics

log = logging.getLogger("embray.serve")

WARMUP_QUERY = "embray warm-up query"


@dataclass
class Loaded:
    """One version, loaded and warmed; immutable once published."""

    index: VersionIndex
    loaded_at: str
    load_seconds: float

    @property
    def version(self) -> str:
        return self.index.version


class ServedVersions:
    """``groups``: the number of shard groups (0: none, this replica holds the shards itself);
    ``prepare_groups(version)``: have one replica of each group load a pinned version."""

    def __init__(
        self,
        collection: Collection,
        metrics: ServeMetrics,
        groups: int = 0,
        prepare_groups: Callable[[str], None] | None = None,
    ):
        self.collection, self.store, self.cfg = collection, collection.store, collection.config
        self.metrics, self.groups, self._prepare_groups = metrics, groups, prepare_groups
        self.current: Loaded | None = None
        self.last_check: str | None = None
        self.last_error: str | None = None
        self.mlflow_down: tuple[str, str] | None = None  # (since, error) while the alias cannot be read
        self._switch = threading.Lock()
        self._liveness = Liveness()  # shard groups' status files, judged by this replica's clock
        cap = self.cfg.serve.max_loaded_versions - 1
        self.pinned: VersionCache[Loaded] = VersionCache(cap, on_evict=self._evicted)
        self._aliases: dict[str, tuple[str | None, float]] = {}  # alias -> (version, when read)
        self._aliases_lock = threading.Lock()

    # --- the active version ---------------------------------------------------------------------
    def check(self) -> bool:
        """Load the version `active` points at, if it is not the one served. True when it switched."""
        with self._switch:  # one load at a time; requests never wait on this
            self.last_check = utcnow()
            try:
                target = self.collection.aliases().get(ACTIVE)
            except EmbrayError as e:  # MLflow is down: keep serving what is loaded, and say so
                if self.mlflow_down is None:
                    self.mlflow_down = (utcnow(), str(e))
                    log.warning("cannot read the active alias (still serving %s): %s", self.served_name(), e)
                self.metrics.mlflow(False)
                return False
            if self.mlflow_down is not None:
                log.info("MLflow is back (unreachable since %s)", self.mlflow_down[0])
                self.mlflow_down = None
            self.metrics.mlflow(True)
            if target is None or (self.current is not None and self.current.version == target):
                self.last_error = None
                self.metrics.alias(target is not None)
                return False
            return self._switch_to(target)

    def _switch_to(self, target: str) -> bool:
        try:
            t = time.monotonic()
            index = self._open(target)
            if self.groups:
                self._await_groups(target)  # the two-phase switch: every group replica has it first
            loaded = Loaded(index, utcnow(), time.monotonic() - t)
        except EmbrayError as e:  # read the alias but could not load its version
            self.last_error = str(e)
            self.metrics.alias(False)
            log.error("could not switch to the active version: %s (still serving %s)", e, self.served_name())
            return False
        old = self.current.version if self.current else None
        self.current = loaded  # the switch: one reference; in-flight requests keep the one they read
        self.last_error = None
        m = index.manifest
        self.metrics.served(old, loaded.version, loaded.load_seconds, m.rows, m.created, m.counts.documents)
        self.metrics.alias(True)
        log.info("serving %s (was %s); loaded and warmed in %.2fs", loaded.version, old, loaded.load_seconds)
        return True

    def _open(self, version: str) -> VersionIndex:
        """Open and warm ``version``: its encoder and shards, or with shard groups the encoder only."""
        if not self.groups:
            index = self.collection.index(version)
            index.search_text([WARMUP_QUERY], k=1)  # loads the encoder and touches every shard
            return index
        manifest = read_manifest(self.store, self.cfg.collection, version)
        shared = self.current.index if self.current else None
        index = VersionIndex(self.store, manifest, encoder_only=True, shared=shared)
        index.embedder.embed_queries([WARMUP_QUERY])
        return index

    def _await_groups(self, version: str) -> None:
        """Wait until every live replica of every shard group reports ``version`` loaded and warm."""
        deadline = time.monotonic() + self.cfg.serve.switch_timeout_s
        while True:
            why = not_ready(self.store, self.cfg.collection, self.groups, version, self._liveness)
            if not why:
                return
            if time.monotonic() > deadline:
                raise EmbrayError(
                    f"not switching to {version}: after {self.cfg.serve.switch_timeout_s:.0f}s "
                    f"(serve.switch_timeout_s) {'; '.join(why)}; tried again at the next check"
                )
            time.sleep(0.25)

    def served_name(self) -> str:
        return self.current.version if self.current else "nothing"

    def mlflow_state(self) -> dict[str, Any]:
        down = self.mlflow_down
        return {"ok": True} if down is None else {"ok": False, "since": down[0], "error": down[1]}

    def serving(self) -> Loaded:
        """The active version, or 503 naming why none is loaded."""
        cur = self.current
        if cur is None:
            why = self.last_error or "no active alias"
            raise HTTPException(503, f"no version of {self.cfg.collection!r} is loaded yet: {why}")
        return cur

    # --- pinned versions ({"version": ...} in a query, and the shadow candidate) --------------------
    def pinned_version(self, requested: str, *, may_block: bool) -> Loaded | None:
        """The loaded version a query pinned (an id or an alias). Without ``may_block``, None where that would
        need an MLflow read or a load; with it, loads the version (evicting the least recently used)."""
        cur = self.current
        if requested == ACTIVE:
            return self.serving()
        vid = requested
        if not is_version_id(requested):
            with self._aliases_lock:
                hit = self._aliases.get(requested)
            if hit is None or time.monotonic() - hit[1] >= self.cfg.serve.poll_s:
                if not may_block:
                    return None
                hit = self._read_alias(requested)
            if hit[0] is None:
                raise HTTPException(
                    404,
                    f"{requested!r} is neither a version id nor an alias of {self.cfg.collection!r}; "
                    "`embray versions` lists both",
                )
            vid = hit[0]
        if cur is not None and vid == cur.version:
            return cur
        got = self.pinned.get(vid)
        if got is not None or not may_block:
            return got
        return self.pinned.open(vid, lambda: self._load_pinned(vid))

    def _read_alias(self, name: str) -> tuple[str | None, float]:
        try:
            hit = (self.collection.aliases().get(name), time.monotonic())
        except EmbrayError as e:
            raise HTTPException(503, f"cannot read alias {name!r} from MLflow: {e}") from e
        with self._aliases_lock:
            self._aliases[name] = hit
        return hit

    def _load_pinned(self, vid: str) -> Loaded:
        t = time.monotonic()
        try:
            manifest = read_manifest(self.store, self.cfg.collection, vid)
        except VersionError as e:  # never committed, or collected
            raise HTTPException(404, str(e)) from e
        except EmbrayError as e:
            raise HTTPException(503, f"could not read version {vid}: {e}") from e
        try:  # opened here, not through the Collection's own cache: only self.pinned keeps it loaded
            shared = self.current.index if self.current else None
            index = VersionIndex(self.store, manifest, shared=shared, encoder_only=bool(self.groups))
            index.search_text([WARMUP_QUERY], k=1)
            if self._prepare_groups is not None:  # one replica of each group loads its part now, the others on use
                self._prepare_groups(vid)
        except FileNotFoundError as e:
            raise HTTPException(404, f"version {vid} was collected while it loaded: {e}") from e
        except EmbrayError as e:
            raise HTTPException(503, f"could not load version {vid}: {e}") from e
        loaded = Loaded(index, utcnow(), time.monotonic() - t)
        log.info("loaded %s for pinned queries in %.2fs", vid, loaded.load_seconds)
        return loaded

    @staticmethod
    def _evicted(vid: str) -> None:  # requests holding it finish with it
        log.info("unloaded pinned version %s (serve.max_loaded_versions)", vid)
