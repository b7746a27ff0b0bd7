"""Is each collection current, consistent, and served as its aliases say? Measure, record, act.

- ``status``: the active and candidate versions (fingerprints, ages); the active version's staleness
  against the source as it is now (a dry-run refresh: new, changed and deleted rows, the stale
  fraction, and the age of the oldest stale row when the source has an ``updated_at`` column);
  consistency (verify of every aliased version; versions in use by fingerprint); what the Serve
  endpoint (``serve.url``) actually answers from. ``problems`` lists what breaks a threshold.
- ``run_monitor``: ``status`` on an interval, each check logged to one MLflow run as metrics over
  time and written to ``<collection>/_status/status.json`` (the Serve app exports it as gauges);
  a refresh when staleness passes ``monitor.max_stale_fraction``, and optionally a promotion of the
  refreshed version through the gates.

Staleness fraction = (new + changed + deleted) / (rows of the active version + new rows).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Callable

from embray.context import Context
from embray.errors import EmbrayError, GateError, StoreError, VersionError
from embray.lifecycle.aliases import promote
from embray.lifecycle.flows import refresh
from embray.lifecycle.registry import ACTIVE, CANDIDATE
from embray.lifecycle.verify import problems as verify_problems
from embray.lifecycle.versions import BuildKind, Manifest, list_versions, read_manifest, utcnow
from embray.pipeline.run import plan_build
from embray.pipeline.types import BuildSpec
from embray.quality.shadow import read_shadow
from embray.results import MonitorAction, SpaceUse, Staleness, StatusReport, VersionCheck, VersionSummary
from embray.storage import layout
from embray.storage.source import inspect_source
from embray.storage.store import Store

log = logging.getLogger("embray")


def _age_s(iso: str, now: dt.datetime) -> float:
    return round((now - dt.datetime.fromisoformat(iso)).total_seconds(), 3)


def staleness(ctx: Context, manifest: Manifest) -> Staleness:
    """How far ``manifest``'s version is behind the source now: a dry-run refresh (Ray scan + plan)."""
    same_shards = ctx.cfg.model_copy(
        update={"index": ctx.cfg.index.model_copy(update={"shards": len(manifest.shards)})}
    )
    spec = BuildSpec(BuildKind.REFRESH, manifest.model, parent=manifest, fingerprint=manifest.fingerprint)
    r = plan_build(ctx.with_config(same_shards), spec)
    c = r.counts
    stale = c.new + c.changed + c.deleted
    total = manifest.rows + c.new
    at = age = None
    if r.oldest_stale_us is not None:
        t = dt.datetime.fromtimestamp(r.oldest_stale_us / 1e6, tz=dt.timezone.utc)
        at = t.isoformat(timespec="seconds")
        age = round((dt.datetime.now(dt.timezone.utc) - t).total_seconds(), 3)
    return Staleness(
        version=manifest.version,
        new=c.new,
        changed=c.changed,
        deleted=c.deleted,
        unchanged=c.reused,
        stale=stale,
        fraction=round(stale / total, 6) if total else 0.0,
        to_embed=r.to_embed,
        source_rows=r.rows,
        source_rejected=r.rejected,
        oldest_stale_at=at,
        oldest_stale_age_s=age,
    )


def served_version(ctx: Context) -> tuple[str | None, str | None]:
    """(version the endpoint at ``serve.url`` answers from, error) -- (None, None) when none is configured."""
    import os

    import requests

    cfg = ctx.cfg
    if not cfg.serve.url:
        return None, None
    url = f"{cfg.serve.url.rstrip('/')}/v1/collections/{cfg.collection}"
    key = cfg.serve.api_key or os.environ.get("EMBRAY_API_KEY")
    try:
        r = requests.get(url, headers={"X-API-Key": key} if key else {}, timeout=10)
    except requests.RequestException as e:
        return None, f"serve endpoint {url} unreachable ({type(e).__name__})"
    if r.status_code != 200:
        return None, f"serve endpoint {url} answered {r.status_code}: {r.text[:200]}"
    try:
        return r.json().get("version"), None
    except (ValueError, AttributeError):
        return None, f"serve endpoint {url} did not answer with embray's JSON: {r.text[:200]!r}"


def _describe(m: Manifest, now: dt.datetime) -> VersionSummary:
    return VersionSummary(
        id=m.version,
        fingerprint=m.fingerprint,
        model=m.model.label,
        rows=m.rows,
        created=m.created,
        age_s=_age_s(m.created, now),
        parent=m.parent,
        segments=sum(len(s.segments) for s in m.shards),
        segmented_shards=sum(1 for s in m.shards if s.segments or s.tombstones),
        dead_rows=sum(s.dead for s in m.shards),
        documents=m.counts.documents,
        truncated_rows=m.counts.truncated,
        truncated_tokens=m.counts.truncated_tokens,
    )


def _aliased(
    ctx: Context, aliases: dict[str, str], problems: list[str], verify: dict[str, VersionCheck]
) -> dict[str, Manifest]:
    """alias -> manifest of active and candidate; an unreadable one is a problem."""
    out: dict[str, Manifest] = {}
    for alias, vid in aliases.items():
        if vid and alias in (ACTIVE, CANDIDATE):
            try:
                out[alias] = read_manifest(ctx.store, ctx.collection, vid)
            except VersionError as e:  # the alias names a version whose manifest is gone or broken
                problems.append(f"{alias} {vid} cannot be read: {e}")
                verify[vid] = VersionCheck(ok=False, problems=[str(e)])
    return out


def _staleness_problems(st: Staleness, mon) -> list[str]:
    out = []
    if st.fraction > mon.max_stale_fraction:
        out.append(
            f"active {st.version} is stale: {st.stale} rows ({st.new} new, {st.changed} changed, "
            f"{st.deleted} deleted) = {st.fraction:.4f} > monitor.max_stale_fraction "
            f"{mon.max_stale_fraction}; run `embray refresh --promote`"
        )
    if mon.max_stale_age_s and (st.oldest_stale_age_s or 0) > mon.max_stale_age_s:
        out.append(
            f"the oldest stale row changed {st.oldest_stale_age_s:.0f}s ago (at {st.oldest_stale_at}) > "
            f"monitor.max_stale_age_s {mon.max_stale_age_s:g}; run `embray refresh --promote`"
        )
    return out


def _served(ctx: Context, problems: list[str]) -> tuple[str | None, bool | None]:
    """(what ``serve.url`` serves, whether that is the alias as it is now); a mismatch is a problem."""
    serve = ctx.cfg.serve
    served, error = served_version(ctx)
    if not serve.url:
        return served, None
    aliases = ctx.registry.aliases()  # the dry run before may have taken minutes: the alias as it is now
    matches = served is not None and served == aliases.get(ACTIVE)
    if error:
        problems.append(error)
    elif not matches:
        problems.append(
            f"{serve.url} serves {served} but alias active is {aliases.get(ACTIVE)}; it switches on its next "
            f"poll (serve.poll_s {serve.poll_s:g}s) or POST .../reload"
        )
    return served, matches


def status(ctx: Context, *, check_verify: bool = True, check_staleness: bool = True) -> StatusReport:
    """The collection at a glance; ``ok`` is false (and ``problems`` says why) when a threshold is broken."""
    t0 = time.monotonic()
    now = dt.datetime.now(dt.timezone.utc)
    problems: list[str] = []
    verify: dict[str, VersionCheck] = {}
    manifests = _aliased(ctx, ctx.registry.aliases(), problems, verify)
    if ACTIVE not in manifests:
        problems.append(f"collection {ctx.collection!r} has no active version; run `embray backfill`")
    stale = None
    if ACTIVE in manifests and check_staleness:
        stale = staleness(ctx, manifests[ACTIVE])
        problems += _staleness_problems(stale, ctx.cfg.monitor)
    if check_verify:
        for alias, m in manifests.items():
            found = verify_problems(ctx.store, ctx.collection, m.version)
            verify[m.version] = VersionCheck(ok=not found, problems=found[:10])
            if found:
                problems.append(f"{alias} {m.version} fails verify: {found[0]}")
    by_fp: dict[str, SpaceUse] = {}
    for alias, m in manifests.items():
        by_fp.setdefault(m.fingerprint, SpaceUse(model=m.model.label)).versions[alias] = m.version
    served, matches = _served(ctx, problems)
    return StatusReport(
        collection=ctx.collection,
        checked_at=now.isoformat(timespec="milliseconds"),
        ok=not problems,
        problems=problems,
        active=_describe(manifests[ACTIVE], now) if ACTIVE in manifests else None,
        candidate=_describe(manifests[CANDIDATE], now) if CANDIDATE in manifests else None,
        staleness=stale,
        verify=verify,
        fingerprints=by_fp,
        consistent=all(v.ok for v in verify.values()) if check_verify else None,
        served=served,
        served_matches=matches,
        seconds=round(time.monotonic() - t0, 3),
        shadow=read_shadow(ctx.store, ctx.collection, manifests[CANDIDATE].version) if CANDIDATE in manifests else None,
    )


def record_status(ctx: Context, st: StatusReport) -> None:
    """Write the latest status where the Serve app reads it (``<collection>/_status/status.json``)."""
    ctx.store.write_bytes(layout.status_file(ctx.collection), json.dumps(st.to_dict(), default=str).encode())


def read_status(store: Store, collection: str) -> StatusReport | None:
    """The status the monitor last recorded, or None (none recorded, or unreadable)."""
    try:
        return StatusReport.from_dict(json.loads(store.read_bytes(layout.status_file(collection))))
    except (FileNotFoundError, StoreError, ValueError, TypeError):
        return None


def check_once(ctx: Context, *, promote_if_gates_pass: bool = False) -> StatusReport:
    """One monitor step: status; a refresh when staleness passes the threshold; maybe a gated promotion."""
    st = status(ctx)
    limit = ctx.cfg.monitor.max_stale_fraction
    frac = st.staleness.fraction if st.staleness else 0.0
    stale = st.active is not None and frac > limit
    built = _refresh_of_this_source(ctx, st.active.id) if stale else None
    action = MonitorAction()
    if built:
        # Refreshing again would build the same version again (and meet the same gates): say so instead.
        action = MonitorAction(
            skipped=f"{built} is already a refresh of {st.active.id} from the source as it is now; "
            f"promote it (`embray promote {built} --force --reason ...` if its gates refuse it) or fix the source"
        )
        log.warning("monitor: %s", action.skipped)
    elif stale:
        result = refresh(ctx)
        action = MonitorAction(refreshed=result.version)
        log.info("monitor: staleness %.4f > %g: refreshed into %s", frac, limit, result.version)
        if promote_if_gates_pass:
            try:
                promote(ctx, result.version, reason=f"monitor: staleness {frac:.4f} > {limit}")
                action = dataclasses.replace(action, promoted=result.version)
            except GateError as e:
                action = dataclasses.replace(action, refused=str(e))
                log.error("monitor: %s", e)
    return dataclasses.replace(st, action=action)


def _refresh_of_this_source(ctx: Context, active: str) -> str | None:
    """A committed, not promoted refresh of ``active`` built from exactly the current source files."""
    children = [
        m for m in list_versions(ctx.store, ctx.collection) if m.parent == active and m.counts.kind == BuildKind.REFRESH
    ]
    if not children:
        return None
    newest = children[-1]  # what it read stands for the unchanged files: only changed ones are hashed
    digest = inspect_source(ctx.cfg.source, newest.inputs, newest.source.id_type).digest
    same = [m.version for m in children if m.source.digest == digest]
    return same[-1] if same else None


def _failed_check(ctx: Context, e: EmbrayError) -> StatusReport:
    return StatusReport(
        collection=ctx.collection,
        checked_at=utcnow(),
        ok=False,
        problems=[f"the monitor's check failed: {e}"],
        error=str(e),
        action=MonitorAction(),
    )


def run_monitor(
    ctx: Context,
    *,
    interval_s: float | None = None,
    iterations: int | None = None,
    promote_if_gates_pass: bool = False,
    on_check: Callable[[StatusReport], None] | None = None,
) -> list[StatusReport]:
    """Check every ``interval_s`` (``iterations`` times, or until stopped); each check becomes MLflow metrics.

    A check that fails (MLflow, the store or the source unreachable) is recorded as a failed data point
    where it can be, and the loop goes on. ``on_check`` sees each result as it comes.
    """
    cfg, registry = ctx.cfg, ctx.registry
    interval = interval_s if interval_s is not None else cfg.monitor.interval_s
    run_id = registry.start_job_run(
        f"monitor-{utcnow()}",
        {"embray.job": "monitor"},
        {
            "interval_s": interval,
            "max_stale_fraction": cfg.monitor.max_stale_fraction,
            "promote": promote_if_gates_pass,
        },
    )
    results: list[StatusReport] = []
    ok = False
    step = 0
    try:
        while iterations is None or step < iterations:
            t = time.monotonic()
            try:
                st = check_once(ctx, promote_if_gates_pass=promote_if_gates_pass)
                a = st.action
                metrics = st.metrics() | {
                    "refreshed": float(bool(a.refreshed)),
                    "promoted": float(bool(a.promoted)),
                    "promote_refused": float(bool(a.refused)),
                }
            except EmbrayError as e:  # one failed check is a data point, not the end of the monitor
                log.error("monitor check %d failed: %s", step, e)
                st, metrics = _failed_check(ctx, e), {"ok": 0.0, "check_failed": 1.0}
            _record_check(ctx, run_id, step, st, metrics)
            results.append(st)
            if on_check:
                on_check(st)
            step += 1
            if iterations is not None and step >= iterations:
                break
            time.sleep(max(0.0, interval - (time.monotonic() - t)))
        ok = True
    except KeyboardInterrupt:
        ok = True  # stopped by its operator: the run is complete, not failed
        raise
    finally:
        try:
            registry.end_run(run_id, ok=ok)
        except EmbrayError as e:  # never hide the error that ended the loop
            log.error("could not close the monitor's MLflow run %s: %s", run_id, e)
    return results


def _record_check(ctx: Context, run_id: str, step: int, st: StatusReport, metrics: dict) -> None:
    """A check to MLflow (metrics at this step) and to the store (for Serve); either may be down."""
    try:
        ctx.registry.log_metrics(run_id, metrics, step=step)
    except EmbrayError as e:
        log.error("monitor check %d: could not log its metrics to MLflow: %s", step, e)
    try:
        record_status(ctx, st)
    except EmbrayError as e:
        log.error("monitor check %d: could not record the status in the store: %s", step, e)
