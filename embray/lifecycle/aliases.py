"""Alias moves: promote (through the gates), rollback, and the ``active`` / ``candidate`` bookkeeping.

Alias moves take the collection's ``aliases`` lease (MLflow has no compare-and-swap), so two
concurrent promotes each land whole, one after the other. The history of ``active`` is kept as a
JSON list in the registered model's tag ``embray.active_history``; rollback steps back through it.
"""

from __future__ import annotations

import json
import logging

from embray.context import Context
from embray.errors import ConfigError, EmbrayError, GateError, VersionError
from embray.lifecycle.lock import ALIASES, Lease
from embray.lifecycle.registry import ACTIVE, CANDIDATE, VERSION_TAG, Registry
from embray.lifecycle.versions import list_version_dirs, list_versions, read_manifest, utcnow, who
from embray.quality.retrieval import check_gates, log_result, result_tags
from embray.results import PromoteResult, RollbackResult
from embray.storage import layout

log = logging.getLogger("embray")

HISTORY_TAG = "embray.active_history"
HISTORY_MAX = 50


def _history(registry: Registry) -> list[str]:
    raw = registry.model_tag(HISTORY_TAG)
    try:
        return list(json.loads(raw)) if raw else []
    except ValueError:
        return []


def sync_registry(ctx: Context) -> None:
    """Register committed versions that MLflow does not know yet (after a crash or an MLflow outage between
    commit and register), once each, and end their runs; drop duplicate model versions of one version."""
    reg = ctx.registry
    by_version: dict[str, list] = {}
    for mv in reg.model_versions():
        by_version.setdefault(mv.tags.get(VERSION_TAG), []).append(mv)
    for m in list_versions(ctx.store, ctx.collection):
        mvs = by_version.get(m.version, [])
        if len(mvs) > 1:
            reg.one_version(m.version, mvs)
        if not mvs:
            log.warning("registering %s, committed earlier but missing from MLflow", m.version)
            reg.register(m, ctx.store.url(layout.version_dir(ctx.collection, m.version)))
            try:
                reg.finish_run(m.mlflow_run_id)
            except EmbrayError as e:  # a deleted run: the version is registered, which is what matters
                log.warning("could not end the MLflow run of %s: %s", m.version, e)


def _alias_lease(ctx: Context, job: str) -> Lease:
    return Lease(ctx.store, ctx.collection, ALIASES, job=job, ttl_s=30).acquire(wait_s=60)


def set_active(
    ctx: Context, version: str, *, reason: str, action: str, tags: dict[str, str] | None = None
) -> str | None:
    """Point ``active`` at ``version`` under the alias lease; returns the version it pointed at before."""
    registry = ctx.registry
    lease = _alias_lease(ctx, action)
    try:
        before = registry.aliases().get(ACTIVE)
        registry.set_alias(ACTIVE, version)
        if registry.aliases().get(CANDIDATE) == version:
            registry.delete_alias(CANDIDATE)
        history = [v for v in _history(registry) if v != version] + [version]
        registry.set_model_tag(HISTORY_TAG, json.dumps(history[-HISTORY_MAX:]))
        registry.tag_version(
            version,
            {
                f"embray.{action}_at": utcnow(),
                f"embray.{action}_by": who(),
                f"embray.{action}_reason": reason,
                "embray.previous_active": before or "none",
                **(tags or {}),
            },
        )
    finally:
        lease.release()
    log.info("%s: active %s -> %s (%s)", action, before, version, reason)
    return before


def set_candidate(ctx: Context, version: str) -> None:
    """Point ``candidate`` at a freshly built shadow version, under the alias lease."""
    lease = _alias_lease(ctx, "migrate")
    try:
        ctx.registry.set_alias(CANDIDATE, version)
        ctx.registry.tag_version(version, {"embray.candidate_at": utcnow(), "embray.candidate_by": who()})
    finally:
        lease.release()


def promote(
    ctx: Context, version: str, *, reason: str = "", force: bool = False, queries: str | None = None
) -> PromoteResult:
    """Move ``active`` to ``version`` once it passes the gates (:func:`embray.quality.retrieval.check_gates`).

    ``force`` overrides the quality gates (recall, nDCG) and needs a ``reason``, which is recorded;
    it never overrides verify: a version with missing or corrupt files cannot be served.
    """
    if force and not reason.strip():
        raise ConfigError("--force needs --reason TEXT: say why the gates are overridden (it is recorded in MLflow)")
    sync_registry(ctx)  # a version committed while MLflow was away is registered first (and MLflow is up)
    report = check_gates(ctx, version, queries=queries)
    failed = report.failed
    summary = "; ".join(f"{g.gate}: {g.detail}" for g in failed)
    if failed and (not force or failed[0].gate == "verify"):
        hint = "repair or rebuild it" if failed[0].gate == "verify" else "or override with --force --reason TEXT"
        raise GateError(f"refusing to promote {version}: {len(failed)} gate(s) failed: {summary}; {hint}")
    gates = [{"gate": g.gate, "passed": g.passed, "value": g.value, "threshold": g.threshold} for g in report.gates]
    tags = {"embray.gates": json.dumps(gates), "embray.promote_forced": "true" if failed else "false"}
    numbers = report.eval.numbers() if report.eval else {}
    tags.update(result_tags("eval", numbers))
    before = set_active(ctx, version, reason=reason or "promoted", action="promote", tags=tags)
    try:
        log_result(ctx, read_manifest(ctx.store, ctx.collection, version).mlflow_run_id, "eval", numbers)
    except EmbrayError as e:  # the tags hold the same numbers; a metric point is not worth failing a promotion
        log.warning("eval metrics of %s not logged to its run: %s", version, e)
    if failed:
        log.warning("promote %s forced past failed gates (%s): %s", version, reason, summary)
    return PromoteResult(active=version, previous=before, gates=report.gates, forced=bool(failed))


def rollback(ctx: Context, *, reason: str = "") -> RollbackResult:
    """Move ``active`` back to the version that was active before the current one."""
    registry = ctx.registry
    lease = _alias_lease(ctx, "rollback")
    try:
        current = registry.aliases().get(ACTIVE)
        committed = set(list_version_dirs(ctx.store, ctx.collection)[0])
        history = [v for v in _history(registry) if v in committed]
        if current in history:
            history = history[: history.index(current)]
        if not history:
            raise VersionError(
                f"collection {ctx.collection!r} has no earlier active version to roll back to (active: {current}); "
                "use `embray promote VERSION` to pick one"
            )
        target = history[-1]
        registry.set_alias(ACTIVE, target)
        registry.set_model_tag(HISTORY_TAG, json.dumps(history))
        registry.tag_version(
            target,
            {
                "embray.rollback_at": utcnow(),
                "embray.rollback_by": who(),
                "embray.rollback_reason": reason or "rollback",
                "embray.rolled_back_from": current or "",
            },
        )
    finally:
        lease.release()
    log.info("rollback: active %s -> %s", current, target)
    return RollbackResult(active=target, previous=current)
