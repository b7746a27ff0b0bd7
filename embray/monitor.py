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

import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from embray.config import Config
from embray.errors import EmbrayError, GateError, StoreError, VersionError
from embray.registry import ACTIVE, CANDIDATE, Registry
from embray.store import Store
from embray.versions import Manifest, read_manifest, utcnow

log = logging.getLogger("embray")

STATUS_FILE = "_status/status.json"


def _age_s(iso: str, now: dt.datetime) -> float:
    return round((now - dt.datetime.fromisoformat(iso)).total_seconds(), 3)


def staleness(cfg: Config, store: Store, manifest: Manifest) -> dict[str, Any]:
    """How far ``manifest``'s version is behind the source now: a dry-run refresh (Ray scan + plan)."""
    from embray.build import BuildSpec, run_build

    same_shards = cfg.model_copy(update={"index": cfg.index.model_copy(update={"shards": len(manifest.shards)})})
    spec = BuildSpec("refresh", manifest.model, parent=manifest, dry_run=True, fingerprint=manifest.fingerprint)
    r = run_build(same_shards, spec, None, store)
    c = r.counts
    stale = c["new"] + c["changed"] + c["deleted"]
    total = manifest.rows + c["new"]
    out: dict[str, Any] = {
        "version": manifest.version,
        "new": c["new"],
        "changed": c["changed"],
        "deleted": c["deleted"],
        "unchanged": c["reused"],
        "stale": stale,
        "fraction": round(stale / total, 6) if total else 0.0,
        "to_embed": c.get("to_embed", 0),
        "source_rows": r.rows,
        "source_rejected": r.rejected,
        "oldest_stale_at": None,
        "oldest_stale_age_s": None,
    }
    us = c.get("oldest_stale_us")
    if us is not None:
        at = dt.datetime.fromtimestamp(us / 1e6, tz=dt.timezone.utc)
        out["oldest_stale_at"] = at.isoformat(timespec="seconds")
        out["oldest_stale_age_s"] = round((dt.datetime.now(dt.timezone.utc) - at).total_seconds(), 3)
    return out


def served_version(cfg: Config) -> tuple[str | None, str | None]:
    """(version the endpoint at ``serve.url`` answers from, error) -- (None, None) when none is configured."""
    import os

    import requests

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


def _describe(m: Manifest, now: dt.datetime) -> dict[str, Any]:
    return {
        "id": m.version,
        "fingerprint": m.fingerprint,
        "model": m.model.label,
        "rows": m.rows,
        "created": m.created,
        "age_s": _age_s(m.created, now),
        "parent": m.parent,
    }


def status(cfg: Config, *, check_verify: bool = True, check_staleness: bool = True) -> dict[str, Any]:
    """The collection at a glance; ``ok`` is false (and ``problems`` says why) when a threshold is broken."""
    from embray.lifecycle import verify

    t0 = time.monotonic()
    now = dt.datetime.now(dt.timezone.utc)
    store = Store(cfg.store.uri, cfg.store.storage_options)
    aliases = Registry(cfg).aliases()
    mon = cfg.monitor
    problems: list[str] = []
    out: dict[str, Any] = {"collection": cfg.collection, "checked_at": now.isoformat(timespec="milliseconds")}
    manifests: dict[str, Manifest] = {}
    for alias, vid in aliases.items():
        if vid and alias in (ACTIVE, CANDIDATE):
            try:
                manifests[alias] = read_manifest(store, cfg.collection, vid)
            except VersionError as e:  # the alias names a version whose manifest is gone or broken
                problems.append(f"{alias} {vid} cannot be read: {e}")
                out.setdefault("verify", {})[vid] = {"ok": False, "problems": [str(e)]}
    for alias in (ACTIVE, CANDIDATE):
        out[alias] = _describe(manifests[alias], now) if alias in manifests else None
    if ACTIVE not in manifests:
        problems.append(f"collection {cfg.collection!r} has no active version; run `embray backfill`")

    out["staleness"] = None
    if ACTIVE in manifests and check_staleness:
        st = out["staleness"] = staleness(cfg, store, manifests[ACTIVE])
        if st["fraction"] > mon.max_stale_fraction:
            problems.append(
                f"active {st['version']} is stale: {st['stale']} rows ({st['new']} new, {st['changed']} changed, "
                f"{st['deleted']} deleted) = {st['fraction']:.4f} > monitor.max_stale_fraction "
                f"{mon.max_stale_fraction}; run `embray refresh --promote`"
            )
        if mon.max_stale_age_s and (st["oldest_stale_age_s"] or 0) > mon.max_stale_age_s:
            problems.append(
                f"the oldest stale row changed {st['oldest_stale_age_s']:.0f}s ago (at {st['oldest_stale_at']}) > "
                f"monitor.max_stale_age_s {mon.max_stale_age_s:g}; run `embray refresh --promote`"
            )

    out.setdefault("verify", {})
    if check_verify:
        for alias, m in manifests.items():
            found = verify(store, cfg.collection, m.version)
            out["verify"][m.version] = {"ok": not found, "problems": found[:10]}
            if found:
                problems.append(f"{alias} {m.version} fails verify: {found[0]}")
    by_fp: dict[str, dict[str, Any]] = {}
    for alias, m in manifests.items():
        entry = by_fp.setdefault(m.fingerprint, {"model": m.model.label, "versions": {}})
        entry["versions"][alias] = m.version
    out["fingerprints"] = by_fp
    out["consistent"] = all(v["ok"] for v in out["verify"].values()) if check_verify else None

    served, error = served_version(cfg)
    if cfg.serve.url:  # the dry run above may have taken minutes: compare with the alias as it is now
        aliases = Registry(cfg).aliases()
    out["served"] = served
    out["served_matches"] = None if not cfg.serve.url else (served is not None and served == aliases.get(ACTIVE))
    if error:
        problems.append(error)
    elif cfg.serve.url and not out["served_matches"]:
        problems.append(
            f"{cfg.serve.url} serves {served} but alias active is {aliases.get(ACTIVE)}; it switches on its next "
            f"poll (serve.poll_s {cfg.serve.poll_s:g}s) or POST .../reload"
        )
    out["problems"] = problems
    out["ok"] = not problems
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


def status_metrics(st: dict[str, Any]) -> dict[str, float]:
    """The numbers of a status, flat, for MLflow and Prometheus."""
    m: dict[str, float] = {"ok": float(st["ok"]), "problems": float(len(st["problems"]))}
    if st.get("active"):
        m.update({"active.age_s": st["active"]["age_s"], "active.rows": st["active"]["rows"]})
    if st.get("staleness"):
        s = st["staleness"]
        m.update({f"staleness.{k}": float(s[k]) for k in ("new", "changed", "deleted", "stale", "fraction")})
        if s["oldest_stale_age_s"] is not None:
            m["staleness.oldest_stale_age_s"] = s["oldest_stale_age_s"]
    if st.get("consistent") is not None:
        m["consistent"] = float(st["consistent"])
    if st.get("served_matches") is not None:
        m["served_matches"] = float(st["served_matches"])
    return m


def record_status(cfg: Config, st: dict[str, Any]) -> None:
    """Write the latest status where the Serve app reads it (``<collection>/_status/status.json``)."""
    store = Store(cfg.store.uri, cfg.store.storage_options)
    store.write_bytes(f"{cfg.collection}/{STATUS_FILE}", json.dumps(st, default=str).encode())


def read_status(store: Store, collection: str) -> dict[str, Any] | None:
    """The status the monitor last recorded, or None."""
    try:
        return json.loads(store.read_bytes(f"{collection}/{STATUS_FILE}"))
    except (FileNotFoundError, StoreError, ValueError):
        return None


def check_once(cfg: Config, *, promote_if_gates_pass: bool = False) -> dict[str, Any]:
    """One monitor step: status; a refresh when staleness passes the threshold; maybe a gated promotion."""
    from embray.flows import refresh
    from embray.lifecycle import promote

    st = status(cfg)
    action: dict[str, Any] = {"refreshed": None, "promoted": None, "refused": None, "skipped": None}
    frac = (st.get("staleness") or {}).get("fraction", 0.0)
    stale = bool(st.get("active")) and frac > cfg.monitor.max_stale_fraction
    built = _refresh_of_this_source(cfg, st["active"]["id"]) if stale else None
    if built:
        # Refreshing again would build the same version again (and meet the same gates): say so instead.
        action["skipped"] = (
            f"{built} is already a refresh of {st['active']['id']} from the source as it is now; "
            f"promote it (`embray promote {built} --force --reason ...` if its gates refuse it) or fix the source"
        )
        log.warning("monitor: %s", action["skipped"])
    elif stale:
        result = refresh(cfg)
        action["refreshed"] = result.version
        log.info(
            "monitor: staleness %.4f > %g: refreshed into %s", frac, cfg.monitor.max_stale_fraction, result.version
        )
        if promote_if_gates_pass:
            try:
                promote(cfg, result.version, reason=f"monitor: staleness {frac:.4f} > {cfg.monitor.max_stale_fraction}")
                action["promoted"] = result.version
            except GateError as e:
                action["refused"] = str(e)
                log.error("monitor: %s", e)
    st["action"] = action
    return st


def _refresh_of_this_source(cfg: Config, active: str) -> str | None:
    """A committed, not promoted refresh of ``active`` built from exactly the current source files."""
    from embray.source import inspect_source
    from embray.versions import list_versions

    store = Store(cfg.store.uri, cfg.store.storage_options)
    children = [
        m for m in list_versions(store, cfg.collection) if m.parent == active and m.counts.get("kind") == "refresh"
    ]
    if not children:
        return None
    digest = inspect_source(cfg.source).digest
    same = [m.version for m in children if m.source.get("digest") == digest]
    return same[-1] if same else None


def run_monitor(
    cfg: Config,
    *,
    interval_s: float | None = None,
    iterations: int | None = None,
    promote_if_gates_pass: bool = False,
    on_check: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Check every ``interval_s`` (``iterations`` times, or until stopped); each check becomes MLflow metrics.

    A check that fails (MLflow, the store or the source unreachable) is recorded as a failed data point
    where it can be, and the loop goes on. ``on_check`` sees each result as it comes.
    """
    registry = Registry(cfg)
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
    results: list[dict[str, Any]] = []
    ok = False
    step = 0
    try:
        while iterations is None or step < iterations:
            t = time.monotonic()
            try:
                st = check_once(cfg, promote_if_gates_pass=promote_if_gates_pass)
                metrics = status_metrics(st)
                metrics.update(
                    refreshed=float(bool(st["action"]["refreshed"])),
                    promoted=float(bool(st["action"]["promoted"])),
                    promote_refused=float(bool(st["action"]["refused"])),
                )
            except EmbrayError as e:  # one failed check is a data point, not the end of the monitor
                log.error("monitor check %d failed: %s", step, e)
                st = {
                    "collection": cfg.collection,
                    "checked_at": utcnow(),
                    "ok": False,
                    "problems": [f"the monitor's check failed: {e}"],
                    "error": str(e),
                    "action": {},
                }
                metrics = {"ok": 0.0, "check_failed": 1.0}
            _record_check(cfg, registry, run_id, step, st, metrics)
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


def _record_check(cfg: Config, registry: Registry, run_id: str, step: int, st: dict, metrics: dict) -> None:
    """A check to MLflow (metrics at this step) and to the store (for Serve); either may be down."""
    try:
        registry.log_metrics(run_id, metrics, step=step)
    except EmbrayError as e:
        log.error("monitor check %d: could not log its metrics to MLflow: %s", step, e)
    try:
        record_status(cfg, st)
    except EmbrayError as e:
        log.error("monitor check %d: could not record the status in the store: %s", step, e)
