"""Shard groups (``serve.shard_groups`` = G > 1): a version too large for one replica, served by G deployments.

Deployment ``EmbrayShardGroup<g>`` holds shard group g of the versions it is asked about (every G-th shard
from g, :func:`embray.search.group_shards`) and answers vector queries that name their version: it never
answers from a version the query did not name. Each replica

- loads the `active` version at start and, like the ingress, follows the alias (``serve.poll_s``, and the
  reload marker within a second), loading a new version *beside* the ones it holds;
- loads any other committed version a query names on demand (a pinned query, the candidate's shadow
  traffic), at most ``serve.max_loaded_versions`` at once (least recently used let go first);
- lets a version go once no query has named it for ``UNLOAD_IDLE_S``, never the alias's, nor the one the
  alias named before until a query names the new one (the ingress has switched); a request still running
  holds its own reference, so it finishes on that version;
- writes what it holds (and is loading) to ``<collection>/_status/groups/G<G>/<g>/<replica>.json`` every
  ``HEARTBEAT_S``, from a thread of its own (so it stays live while it loads). Serving with shard groups
  needs write access to the store's ``_status/``.

The ingress switches to a new version only when every live replica of every group lists it there (the
two-phase switch), so no query waits on a load and no answer mixes versions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from embray.cache import VersionCache
from embray.collection import Collection
from embray.config import Config, parse_config
from embray.errors import EmbrayError, VersionError
from embray.lifecycle.registry import ACTIVE
from embray.lifecycle.versions import read_manifest, utcnow
from embray.results import Hit
from embray.search import VersionIndex
from embray.serving.watch import poll_loop
from embray.storage.layout import group_status_dir
from embray.storage.store import Store

log = logging.getLogger("embray.serve")

HEARTBEAT_S = 2.0  # a group replica rewrites its status file this often
STALE_S = 10.0  # a status file older than this is a replica that is gone (or stuck): not counted
PRUNE_S = 3600.0  # a starting replica deletes its group's status files older than this
UNLOAD_IDLE_S = 10.0  # a version no query named for this long, and not the alias's, is let go


def replica_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def group_deployment(g: int) -> str:
    return f"EmbrayShardGroup{g}"


def serve_config(config: dict[str, Any]) -> Config:
    """A replica's config: Serve's short MLflow budget (a poll that fails comes back at the next one)."""
    cfg: Config = parse_config(config["data"], base_dir=config.get("base_dir", "."), origin="serve")
    quick = {"max_retries": min(cfg.mlflow.max_retries, 1), "timeout_s": min(cfg.mlflow.timeout_s, 5)}
    return cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update=quick)})


@dataclass(frozen=True)
class GroupReplica:
    """One shard-group replica, as its status file says."""

    group: int
    replica: str
    loaded: tuple[str, ...]
    age_s: float


class Liveness:
    """Which status files are live, judged by the reader's own clock: a file whose ``ts`` moved within
    STALE_S of this process's monotonic time (clocks of other hosts may be off). A file seen for the first
    time counts as live when its ``ts`` is within STALE_S of this host's wall clock."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, float]] = {}  # replica -> (its ts, our monotonic time it changed)

    def live(self, replica: str, ts: float) -> bool:
        now = time.monotonic()
        last = self._seen.get(replica)
        if last is None:
            fresh = abs(time.time() - ts) <= STALE_S
            self._seen[replica] = (ts, now if fresh else now - 2 * STALE_S)
        elif last[0] != ts:
            self._seen[replica] = (ts, now)
        return now - self._seen[replica][1] <= STALE_S


def read_groups(
    store: Store, collection: str, groups: int, liveness: Liveness | None = None
) -> dict[int, list[GroupReplica]]:
    """The live replicas of each group 0..groups-1, from their status files."""
    liveness = liveness or Liveness()
    out: dict[int, list[GroupReplica]] = {}
    for g in range(groups):
        d = group_status_dir(collection, groups, g)
        out[g] = []
        for name in store.listdir(d):
            if not name.endswith(".json"):
                continue
            try:
                doc = json.loads(store.read_bytes(f"{d}/{name}"))
                replica, ts, loaded = str(doc["replica"]), float(doc["ts"]), tuple(doc.get("loaded", ()))
            except (FileNotFoundError, ValueError, KeyError, TypeError, EmbrayError):
                continue  # being replaced, removed by a replica that stopped, or not a status file
            if liveness.live(replica, ts):
                out[g].append(GroupReplica(g, replica, loaded, time.time() - ts))
    return out


def not_ready(store: Store, collection: str, groups: int, version: str, liveness: Liveness | None = None) -> list[str]:
    """Why ``version`` cannot be switched to yet: a group with no live replica, or a live replica that has
    not loaded it (empty: every live replica of every group holds it, loaded and warm)."""
    why = []
    for g, replicas in read_groups(store, collection, groups, liveness).items():
        if not replicas:
            why.append(f"shard group {g} ({group_deployment(g)}) has no live replica")
        why += [
            f"{group_deployment(g)} replica {r.replica} has not loaded it" for r in replicas if version not in r.loaded
        ]
    return why


@serve.deployment(name="EmbrayShardGroup", max_ongoing_requests=32, max_queued_requests=64)
class EmbrayShardGroup:
    """Shard group ``group`` of ``groups``; called by the ingress (EmbrayServer) through a deployment handle."""

    def __init__(self, config: dict[str, Any], group: int, groups: int):
        self.cfg = serve_config(config)
        self.group, self.groups = group, groups
        self.collection = Collection(self.cfg)
        self.store = self.collection.store
        self.replica = replica_name()
        self.target: str | None = None  # the version alias `active` names
        self.previous: str | None = None  # the one it named before: kept until a query names the new one
        self.loading: str | None = None
        self.loaded: VersionCache[VersionIndex] = VersionCache(
            self.cfg.serve.max_loaded_versions, keep=self._kept, on_evict=self._evicted
        )
        self._stop = threading.Event()
        self._prune()
        # A thread of its own: a replica that is loading a large version (or waiting on MLflow) stays live.
        threading.Thread(target=self._beat_loop, name="embray-group-heartbeat", daemon=True).start()
        self.check()  # warm with the active version before Serve routes anything here
        args = (self._stop, self.store, self.cfg.collection, self.cfg.serve.poll_s, self.check)
        kw = {"every_tick": self._tick}
        threading.Thread(target=poll_loop, args=args, kwargs=kw, name="embray-group-poller", daemon=True).start()

    # --- what the ingress calls ---------------------------------------------------------------
    async def search(
        self,
        group: tuple[int, int],
        version: str,
        vectors: np.ndarray,
        k: int,
        chunks: bool = False,
        where: dict | None = None,
    ) -> list[list[Hit]]:
        """Top k of this group's shards of ``version`` for each query row (loaded first if need be).

        ``group`` is the (g, G) the ingress asks for: refused unless it is this replica's (during a redeploy
        that changes serve.shard_groups, old and new replicas of one name answer side by side). On the
        replica's event loop (a thread hop costs ~0.5 ms a call, bench/serve_groups.py); a version that has
        to be loaded first is loaded off it, so queries for the loaded ones go on meanwhile. ``where``: the
        query's ``filter`` and ``fields`` (:meth:`VersionIndex.search_vectors`)."""
        if tuple(group) != (self.group, self.groups):
            raise VersionError(
                f"this replica serves shard group {self.group} of {self.groups}, asked for {group[0]} of {group[1]}"
                " (a redeploy changing serve.shard_groups is rolling out; ask again)"
            )
        if version == self.target:
            self.previous = None  # the ingress has switched: the previous version may go once idle
        index = self.loaded.get(version) or await asyncio.to_thread(self._open, version)
        where = dict(where or {})
        if where.pop("mode", "vector") == "keyword":  # the query's texts come with it instead of vectors
            return index.search_keywords(where.pop("texts"), k, chunks=chunks, **where)
        return index.search_vectors(vectors, k, chunks=chunks, **where)  # (filter, fields)

    async def prepare(self, version: str) -> list[str]:
        """Load ``version`` now (a pinned query's, before it is asked for); the versions held."""
        self.loaded.get(version) or await asyncio.to_thread(self._open, version)
        return self.loaded_versions()

    def loaded_versions(self) -> list[str]:
        return self.loaded.ids()

    # --- loading and letting go -----------------------------------------------------------------
    def _open(self, version: str) -> VersionIndex:
        index = self.loaded.open(version, lambda: self._load(version))
        self._heartbeat()
        return index

    def _load(self, version: str) -> VersionIndex:
        t = time.monotonic()
        self.loading = version
        try:
            manifest = read_manifest(self.store, self.cfg.collection, version)  # VersionError: not committed
            index = VersionIndex(self.store, manifest, group=(self.group, self.groups))
            if index.shards:  # touch every shard (its pages) before the first real query
                q = np.ones((1, manifest.dims), dtype=np.float32) / np.sqrt(manifest.dims)
                index.search_vectors(q, 1)
        finally:
            self.loading = None
        what = "%s loaded %s (%d shards) in %.2fs"
        log.info(what, group_deployment(self.group), version, len(index.shards), time.monotonic() - t)
        return index

    def _kept(self) -> set[str | None]:
        """Versions never let go: the alias's, and the previous one until a query names the alias's."""
        return {self.target, self.previous}

    def _evicted(self, version: str) -> None:
        log.info("%s let go of %s (serve.max_loaded_versions)", group_deployment(self.group), version)

    def check(self) -> None:
        """Load the version the `active` alias names, beside the ones held."""
        try:
            target = self.collection.aliases().get(ACTIVE)
        except EmbrayError as e:  # MLflow down: queries name their version; nothing to do until it is back
            log.warning("cannot read the active alias: %s", e)
            return
        if target != self.target:
            self.previous, self.target = self.target, target
        if target is not None:
            try:
                self.loaded.get(target) or self._open(target)
            except Exception as e:  # noqa: BLE001 - a version that cannot load must not stop the replica
                log.error("%s could not load the active version %s: %s", group_deployment(self.group), target, e)

    def _tick(self) -> None:
        idle = self.loaded.drop_idle(UNLOAD_IDLE_S)  # a request still running on one holds its own reference
        for v in idle:
            log.info("%s let go of %s (no query named it for %.0fs)", group_deployment(self.group), v, UNLOAD_IDLE_S)
        if idle:
            self._heartbeat()

    def _beat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._heartbeat()

    # --- the status file ------------------------------------------------------------------------
    def _status_rel(self) -> str:
        return f"{group_status_dir(self.cfg.collection, self.groups, self.group)}/{self.replica}.json"

    def _heartbeat(self) -> None:
        doc = {
            "group": self.group,
            "replica": self.replica,
            "loaded": self.loaded_versions(),
            "target": self.target,
            "loading": self.loading,
            "ts": time.time(),
            "at": utcnow(),
        }
        try:
            self.store.write_bytes(self._status_rel(), json.dumps(doc).encode())
        except EmbrayError as e:  # the ingress waits for it (switch_timeout_s) and says why
            log.warning("cannot write the shard-group status file: %s", e)

    def _prune(self) -> None:
        d = group_status_dir(self.cfg.collection, self.groups, self.group)
        now = time.time()
        for name in self.store.listdir(d):
            try:
                if now - float(json.loads(self.store.read_bytes(f"{d}/{name}")).get("ts", 0)) > PRUNE_S:
                    self.store.delete(f"{d}/{name}")
            except (FileNotFoundError, ValueError, EmbrayError):
                continue

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            try:  # gone at once instead of STALE_S later
                self.store.delete(self._status_rel())
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
