"""Garbage collection: old versions no alias points at and no kept version reuses, failed builds, unused caches."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from embray.context import Context
from embray.errors import ConfigError, EmbrayError
from embray.lifecycle.lock import ALIASES, WRITER, Lease
from embray.lifecycle.versions import Manifest, list_version_dirs, read_manifest
from embray.results import GcResult
from embray.storage import layout
from embray.storage.store import Store

log = logging.getLogger("embray")


def _old_scratch(store: Store, collection: str, older_than_s: float = 3600) -> list[str]:
    """Scratch directories of dry runs (named like version ids, so by start time) older than an hour."""
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than_s)
    old = []
    for name in store.listdir(layout.scratch_root(collection)):
        try:
            started = dt.datetime.strptime(name[1:16], "%Y%m%dT%H%M%S").replace(tzinfo=dt.timezone.utc)
        except ValueError:
            continue  # not ours
        if started < cutoff:
            old.append(name)
    return old


def _unused_states(store: Store, collection: str, kept: list[Manifest]) -> list[str]:
    """Source row-state files no kept version records (those of deleted versions and of failed builds).

    The caller holds the writer lease, so no build is writing new ones meanwhile."""
    used = {i.state.path for m in kept for i in m.inputs}
    return [n for n in store.parquet_names(layout.sources_dir(collection)) if n not in used]


def _kept(manifests: dict[str, Manifest], aliased: set[str], keep: int) -> set[str]:
    """The ``keep`` newest, every aliased one, and whatever a kept version reuses files from, transitively."""
    newest = sorted(manifests, key=lambda v: (manifests[v].created, v))[-keep:]
    kept = set(newest) | (aliased & set(manifests))
    todo = list(kept)
    while todo:
        for ref in manifests[todo.pop()].referenced_versions():
            if ref not in kept and ref in manifests:
                kept.add(ref)
                todo.append(ref)
    return kept


def gc(ctx: Context, *, keep: int, dry_run: bool = False) -> GcResult:
    """Delete old versions no alias points at and no kept version reuses files of; and failed builds."""
    if keep < 1:
        raise ConfigError(f"gc keep={keep}: keep at least 1 version (--keep N with N >= 1)")
    store, col = ctx.store, ctx.collection
    with Lease(store, col, WRITER, job="gc", ttl_s=ctx.cfg.store.lease_ttl_s) as lease:
        committed, uncommitted = list_version_dirs(store, col)
        manifests = {v: read_manifest(store, col, v) for v in committed}
        kept = _kept(manifests, {v for v in ctx.registry.aliases().values() if v}, keep)
        live_fps = {manifests[v].fingerprint for v in kept}
        out = GcResult(
            kept=sorted(kept),
            deleted=[v for v in committed if v not in kept],
            unfinished=uncommitted,
            caches=[fp for fp in store.listdir(layout.caches_dir(col)) if fp not in live_fps],
            scratch=_old_scratch(store, col),
            dry_run=dry_run,
            source_states=_unused_states(store, col, [manifests[v] for v in kept]),
        )
        if dry_run:
            return out
        # Deletes cannot be fenced like a commit: the lease is checked before each version and each kind
        # of leftover, so a gc paused past its lease stops within one step of waking up.
        for v in out.deleted:
            lease.check_held()
            store.delete(layout.manifest_rel(col, v))  # invisible first, then the files
            store.delete(layout.version_dir(col, v))
            store.delete(layout.shadow_dir(col, v))
            try:
                ctx.registry.delete_version(v)
            except EmbrayError as e:
                log.warning("deleted %s but could not remove its MLflow model version: %s", v, e)
        lease.check_held()
        for v in uncommitted:
            store.delete(layout.version_dir(col, v))
        lease.check_held()
        for fp in out.caches:
            store.delete(f"{layout.caches_dir(col)}/{fp}")
        lease.check_held()
        for name in out.scratch:
            store.delete(layout.scratch_dir(col, name))
        lease.check_held()
        for name in out.source_states:
            store.delete(f"{layout.sources_dir(col)}/{name}")
        lease.check_held()
        pruned = lease.prune() + Lease(store, col, ALIASES, job="gc").prune()
        out = dataclasses.replace(out, lease_files=pruned)
    log.info(
        "gc %s: kept %d, deleted %d versions, %d unfinished builds, %d caches",
        col,
        len(kept),
        len(out.deleted),
        len(uncommitted),
        len(out.caches),
    )
    return out
