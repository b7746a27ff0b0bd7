"""The three ways a version is made, each one writer per collection at a time.

- ``backfill``: the whole corpus with the configured model (the first version becomes ``active``).
- ``refresh``: the corpus against a parent version in the same space; only new and changed rows are
  embedded, deleted ids dropped, unchanged vectors and shards reused. Not promoted unless asked.
- ``migrate``: the whole corpus under another model, into a version marked ``candidate``.

All three run :func:`embray.build.run_build`; a rerun after a crash resumes from the vector cache.
"""

from __future__ import annotations

import dataclasses
import logging

from embray.build import BuildResult, BuildSpec, run_build
from embray.config import Config
from embray.errors import VersionError
from embray.lifecycle import promote, set_active, set_candidate
from embray.lock import WRITER, Lease
from embray.models import ModelSpec, fingerprint
from embray.registry import ACTIVE, CANDIDATE, Registry
from embray.search import resolve_version
from embray.store import Store
from embray.versions import list_versions, read_manifest, version_dir

log = logging.getLogger("embray")


def _open(cfg: Config) -> tuple[Store, Registry]:
    store = Store(cfg.store.uri, cfg.store.storage_options)
    store.check_writable()
    registry = Registry(cfg)
    sync_registry(store, registry, cfg.collection)  # also fails fast when MLflow is unreachable
    return store, registry


def sync_registry(store: Store, registry: Registry, collection: str) -> None:
    """Register committed versions that MLflow does not know yet (after a crash between commit and register)."""
    known = registry.registered_versions()
    for m in list_versions(store, collection):
        if m.version not in known:
            log.warning("registering %s, committed earlier but missing from MLflow", m.version)
            registry.register(m, store.url(version_dir(collection, m.version)))


def backfill(cfg: Config, *, promote: bool = True) -> BuildResult:
    """Build a new version of ``cfg.collection`` from its whole source."""
    store, registry = _open(cfg)
    with Lease(store, cfg.collection, WRITER, job="backfill"):
        result = run_build(cfg, BuildSpec("backfill", cfg.model), registry, store)
        if promote and ACTIVE not in registry.aliases():
            set_active(
                cfg,
                store,
                registry,
                result.version,
                reason="first version of the collection",
                action="promote",
                tags={"embray.gates": "not run: the first version of a collection becomes active at once"},
            )
            result = dataclasses.replace(result, aliases=(ACTIVE,))
    return result


def refresh(cfg: Config, *, parent: str | None = None, dry_run: bool = False, promote_it: bool = False) -> BuildResult:
    """Bring a version up to date with the source: a child version that re-embeds only what changed."""
    store, registry = _open(cfg)
    vid = resolve_version(cfg, parent)
    base = read_manifest(store, cfg.collection, vid)
    fp = fingerprint(cfg.model)
    if fp != base.fingerprint:
        raise VersionError(
            f"version {vid} was embedded by {base.model.label} (fingerprint {base.fingerprint}), but the config's "
            f"model is {cfg.model.label} (fingerprint {fp}); a refresh never mixes two vector spaces: "
            "use `embray migrate` to move to the new model, or set `model` back to the version's"
        )
    spec = BuildSpec("refresh", base.model, parent=base, dry_run=dry_run)
    if dry_run:  # writes only scratch files outside versions/, like `embray status`: no writer lease
        return run_build(cfg, spec, registry, store)
    with Lease(store, cfg.collection, WRITER, job="refresh"):
        result = run_build(cfg, spec, registry, store)
    if promote_it and result.version:
        promote(cfg, result.version, reason=f"refresh of {vid}")
        result = dataclasses.replace(result, aliases=(ACTIVE,))
    return result


def migrate(cfg: Config, model: ModelSpec) -> BuildResult:
    """Re-embed the whole collection with ``model`` into a new version marked ``candidate``."""
    store, registry = _open(cfg)
    active = registry.aliases().get(ACTIVE)
    parent = read_manifest(store, cfg.collection, active) if active else None
    fp = fingerprint(model)
    if parent is not None and parent.fingerprint == fp:
        raise VersionError(
            f"the active version {parent.version} already uses {model.label} (fingerprint {fp}); "
            "a migration needs a different model: use `embray refresh` to bring it up to date instead"
        )
    with Lease(store, cfg.collection, WRITER, job="migrate"):
        result = run_build(
            cfg,
            BuildSpec("migrate", model, parent=parent, params={"migrated_from": parent.fingerprint if parent else ""}),
            registry,
            store,
        )
        set_candidate(cfg, store, registry, result.version)
    return dataclasses.replace(result, aliases=(CANDIDATE,))
