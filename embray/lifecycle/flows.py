"""The ways a version is made, each one writer per collection at a time.

- ``backfill``: the whole corpus with the configured model (the first version becomes ``active``).
- ``refresh``: the corpus against a parent version in the same space; only new and changed rows are
  embedded, deleted ids dropped, unchanged vectors and shards reused. Not promoted unless asked.
- ``migrate``: the whole corpus under another model, into a version marked ``candidate``.
- ``compact``: a version's own rows again, with every shard that has delta segments or tombstones rebuilt
  whole; the corpus is not read and nothing is embedded.

All of them run :func:`embray.pipeline.run.run_build`; a rerun after a crash resumes from the vector cache.
"""

from __future__ import annotations

import dataclasses
import logging

from embray.context import Context
from embray.errors import VersionError
from embray.lifecycle.aliases import promote, set_active, set_candidate, sync_registry
from embray.lifecycle.lock import WRITER, Lease
from embray.lifecycle.registry import ACTIVE, CANDIDATE
from embray.lifecycle.versions import BuildKind, Manifest, read_manifest, same_chunking
from embray.models import fingerprint
from embray.models.spec import ModelSpec
from embray.pipeline.passages import chunking
from embray.pipeline.run import plan_build, run_build
from embray.pipeline.types import BuildSpec
from embray.results import BuildResult, PlanResult

log = logging.getLogger("embray")


def resolve(ctx: Context, version: str | None, alias: str = ACTIVE) -> str:
    """``version`` itself, or the version ``alias`` points at."""
    if version:
        return version
    target = ctx.registry.aliases().get(alias)
    if not target:
        raise VersionError(
            f"collection {ctx.collection!r} has no {alias!r} version yet; run `embray backfill --config ...` "
            "(the first version becomes active) or name one with --version"
        )
    return target


def _open_for_writing(ctx: Context) -> None:
    ctx.store.check_writable()
    sync_registry(ctx)  # also fails fast when MLflow is unreachable


def _writer(ctx: Context, job: str) -> Lease:
    return Lease(ctx.store, ctx.collection, WRITER, job=job, ttl_s=ctx.cfg.store.lease_ttl_s)


def backfill(ctx: Context, *, promote: bool = True) -> BuildResult:
    """Build a new version of the collection from its whole source."""
    _open_for_writing(ctx)
    active = ctx.registry.aliases().get(ACTIVE)
    like = read_manifest(ctx.store, ctx.collection, active) if active else None  # (its chunking, if chunk: is unset)
    with _writer(ctx, "backfill") as lease:
        result = run_build(ctx, BuildSpec(BuildKind.BACKFILL, ctx.cfg.model, like=like), lease)
        if promote and ACTIVE not in ctx.registry.aliases():
            set_active(
                ctx,
                result.version,
                reason="first version of the collection",
                action="promote",
                tags={"embray.gates": "not run: the first version of a collection becomes active at once"},
            )
            result = dataclasses.replace(result, aliases=(ACTIVE,))
    return result


def _refresh_base(ctx: Context, parent: str | None) -> Manifest:
    vid = resolve(ctx, parent)
    base = read_manifest(ctx.store, ctx.collection, vid)
    fp = fingerprint(ctx.cfg.model)
    if fp != base.fingerprint:
        raise VersionError(
            f"version {vid} was embedded by {base.model.label} (fingerprint {base.fingerprint}), but the config's "
            f"model is {ctx.cfg.model.label} (fingerprint {fp}); a refresh never mixes two vector spaces: "
            "use `embray migrate` to move to the new model, or set `model` back to the version's"
        )
    chunk = chunking(ctx.cfg, BuildKind.REFRESH, base.model, base)
    if not same_chunking(chunk, base.chunk):
        raise VersionError(
            f"version {vid} was cut into passages {_chunk_label(base.chunk)}, but the config's chunk: says "
            f"{_chunk_label(chunk)}; a refresh never mixes two chunkings: use `embray migrate` to re-cut the "
            "collection, or set chunk: back to the version's (or leave it out)"
        )
    return base


def _chunk_label(chunk) -> str:
    return "none (one vector per row)" if chunk is None else f"of {chunk.tokens} tokens, overlap {chunk.overlap}"


def plan_refresh(ctx: Context, parent: str | None = None) -> PlanResult:
    """What a refresh of ``parent`` (default: active) would do now. Writes only scratch files; takes no lease."""
    base = _refresh_base(ctx, parent)
    spec = BuildSpec(BuildKind.REFRESH, base.model, parent=base, fingerprint=base.fingerprint)
    return plan_build(ctx, spec, with_estimate=True)


def refresh(ctx: Context, *, parent: str | None = None, promote_it: bool = False) -> BuildResult:
    """Bring a version up to date with the source: a child version that re-embeds only what changed."""
    _open_for_writing(ctx)
    base = _refresh_base(ctx, parent)
    with _writer(ctx, "refresh") as lease:
        result = run_build(ctx, BuildSpec(BuildKind.REFRESH, base.model, parent=base), lease)
    if promote_it:
        promote(ctx, result.version, reason=f"refresh of {base.version}")
        result = dataclasses.replace(result, aliases=(ACTIVE,))
    return result


def _migration_parent(ctx: Context, model: ModelSpec) -> Manifest | None:
    """The active version a migration to ``model`` starts from (lineage only: no vector is reused)."""
    active = ctx.registry.aliases().get(ACTIVE)
    parent = read_manifest(ctx.store, ctx.collection, active) if active else None
    fp = fingerprint(model)
    chunk = chunking(ctx.cfg, BuildKind.MIGRATE, model, parent)
    if parent is not None and parent.fingerprint == fp and same_chunking(parent.chunk, chunk):
        raise VersionError(
            f"the active version {parent.version} already uses {model.label} (fingerprint {fp}) and chunk "
            f"{_chunk_label(chunk)}; a migration needs a different model or chunking: use `embray refresh` to "
            "bring it up to date instead"
        )
    return parent


def plan_migrate(ctx: Context, model: ModelSpec) -> PlanResult:
    """What a migration to ``model`` would embed and cost. Writes only scratch files; takes no lease."""
    parent = _migration_parent(ctx, model)
    return plan_build(ctx, BuildSpec(BuildKind.MIGRATE, model, parent=parent), with_estimate=True)


def migrate(ctx: Context, model: ModelSpec) -> BuildResult:
    """Re-embed the whole collection with ``model`` into a new version marked ``candidate``."""
    _open_for_writing(ctx)
    parent = _migration_parent(ctx, model)
    params = {"migrated_from": parent.fingerprint if parent else ""}
    with _writer(ctx, "migrate") as lease:
        result = run_build(ctx, BuildSpec(BuildKind.MIGRATE, model, parent=parent, params=params), lease)
        set_candidate(ctx, result.version)
    return dataclasses.replace(result, aliases=(CANDIDATE,))


def compact(ctx: Context, *, version: str | None = None, promote_it: bool = False) -> BuildResult:
    """A child of ``version`` (default: active) with the same rows, its segmented shards rebuilt whole."""
    _open_for_writing(ctx)
    base = read_manifest(ctx.store, ctx.collection, resolve(ctx, version))
    segmented = [s.shard for s in base.shards if s.segments or s.tombstones]
    if not segmented:
        raise VersionError(
            f"version {base.version} has no delta segments or tombstones: nothing to compact "
            "(`embray status` shows how many segments the active version holds)"
        )
    params = {"compacted_shards": ",".join(map(str, segmented))}
    spec = BuildSpec(BuildKind.COMPACT, base.model, parent=base, params=params, fingerprint=base.fingerprint)
    with _writer(ctx, "compact") as lease:
        result = run_build(ctx, spec, lease)
    if promote_it:
        promote(ctx, result.version, reason=f"compaction of {base.version}")
        result = dataclasses.replace(result, aliases=(ACTIVE,))
    return result
