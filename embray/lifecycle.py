"""After a version is built: verify it, move aliases (promote, rollback), and collect garbage.

Alias moves take the collection's ``aliases`` lease (MLflow has no compare-and-swap), so two
concurrent promotes each land whole, one after the other. The history of ``active`` is kept
as a JSON list in the registered model's tag ``embray.active_history``; rollback steps back
through it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from embray import rows as R
from embray.build import SCRATCH
from embray.config import Config
from embray.errors import ConfigError, EmbrayError, GateError, VersionError
from embray.lock import ALIASES, WRITER, Lease
from embray.registry import ACTIVE, CANDIDATE, Registry
from embray.store import Store, local_tmpdir, sha256_of
from embray.versions import MANIFEST, file_rel, list_version_dirs, read_manifest, utcnow, version_dir, who

log = logging.getLogger("embray")

HISTORY_TAG = "embray.active_history"
HISTORY_MAX = 50


# --- verify ---------------------------------------------------------------------------


def _file_digest(store: Store, rel: str) -> tuple[str, int]:
    with store.fs.open(store.path(rel), "rb") as fh:
        return sha256_of(fh)


def verify(store: Store, collection: str, version: str) -> list[str]:
    """Every problem found with a committed version; an empty list means it is sound.

    Checks: the manifest parses; every file is present with its recorded size and sha256; every
    embeddings part and shard carries the manifest's fingerprint; part, index and manifest row
    counts agree; ids are unique and in the shard their hash assigns; content digests match.
    """
    import numpy as np
    import pyarrow.parquet as pq
    from usearch.index import Index

    try:
        m = read_manifest(store, collection, version)
    except VersionError as e:
        return [str(e)]
    problems: list[str] = []
    fps = {s.fingerprint for s in m.shards}
    if fps - {m.fingerprint}:
        problems.append(f"mixed fingerprints: manifest {m.fingerprint}, shards {sorted(fps - {m.fingerprint})}")
    if len(m.shards) != int(m.index.get("shards", len(m.shards))):
        problems.append(f"manifest lists {len(m.shards)} shards, its index config says {m.index.get('shards')}")
    for f in m.files():
        rel = file_rel(m, f)
        try:
            sha, size = _file_digest(store, rel)
        except FileNotFoundError:
            problems.append(f"missing file {store.url(rel)}")
            continue
        if (sha, size) != (f.sha256, f.bytes):
            problems.append(
                f"checksum mismatch {store.url(rel)}: {size} bytes sha256 {sha[:16]}..., "
                f"manifest says {f.bytes} bytes sha256 {f.sha256[:16]}..."
            )
    if problems:
        return problems  # the rest reads those files

    seen: set[Any] = set()
    total = 0
    tmp = local_tmpdir("embray-verify-")
    try:
        for s in m.shards:
            if s.embeddings is None or s.index is None:
                problems.append(f"shard {s.shard} has no {'embeddings' if s.embeddings is None else 'index'} file")
                continue
            rel = file_rel(m, s.embeddings)
            part = pq.read_table(store.path(rel), filesystem=store.pyarrow_fs())
            part_fp = (part.schema.metadata or {}).get(b"embray.fingerprint", b"").decode()
            if part_fp != m.fingerprint:
                problems.append(
                    f"shard {s.shard}: embeddings part has fingerprint {part_fp!r}, the version {m.fingerprint}"
                )
            if part.num_rows != s.rows:
                problems.append(f"shard {s.shard}: embeddings part has {part.num_rows} rows, manifest {s.rows}")
            ids = part.column("id").to_pylist()
            dup = len(ids) - len(set(ids))
            if dup:
                problems.append(f"shard {s.shard}: {dup} duplicate ids")
            across = seen.intersection(ids)
            if across:
                problems.append(
                    f"shard {s.shard}: {len(across)} ids also in another shard, e.g. {next(iter(across))!r}"
                )
            seen.update(ids)
            misplaced = sum(1 for i in ids if R.shard_of(i, len(m.shards)) != s.shard)
            if misplaced:
                problems.append(f"shard {s.shard}: {misplaced} ids belong to another shard")
            order = sorted(range(len(ids)), key=lambda i: ids[i])
            hashes = part.column("content_hash").to_pylist()
            if R.digest_pairs([ids[i] for i in order], [hashes[i] for i in order]) != s.content_digest:
                problems.append(f"shard {s.shard}: content digest does not match the manifest")
            total += part.num_rows
            local = tmp / "index.usearch"
            if store.remote:
                store.download(file_rel(m, s.index), local)
            index = Index.restore(str(local if store.remote else store.path(file_rel(m, s.index))), view=True)
            if index is None:
                problems.append(f"shard {s.shard}: index file is not a USearch index")
                continue
            if len(index) != s.rows or index.ndim != m.dims:
                problems.append(
                    f"shard {s.shard}: index holds {len(index)} vectors of {index.ndim} dims, "
                    f"manifest {s.rows} of {m.dims}"
                )
            elif s.rows:
                keys = part.column("key").to_numpy()
                if not np.all(index.contains(keys)):
                    problems.append(f"shard {s.shard}: index and embeddings part disagree on keys")
            del index
            if local.exists():
                local.unlink()
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    if total != m.counts.get("rows", total) or total != m.rows:
        problems.append(f"parts hold {total} rows, manifest says {m.counts.get('rows')}")
    return problems


# --- aliases ---------------------------------------------------------------------------


def _history(registry: Registry) -> list[str]:
    raw = registry.model_tag(HISTORY_TAG)
    try:
        return list(json.loads(raw)) if raw else []
    except ValueError:
        return []


def _alias_lease(store: Store, cfg: Config, job: str) -> Lease:
    return Lease(store, cfg.collection, ALIASES, job=job, ttl_s=30).acquire(wait_s=60)


def set_active(
    cfg: Config,
    store: Store,
    registry: Registry,
    version: str,
    *,
    reason: str,
    action: str,
    tags: dict[str, str] | None = None,
) -> str | None:
    """Point ``active`` at ``version`` under the alias lease; returns the version it pointed at before."""
    lease = _alias_lease(store, cfg, action)
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


def set_candidate(cfg: Config, store: Store, registry: Registry, version: str) -> None:
    """Point ``candidate`` at a freshly built shadow version, under the alias lease."""
    lease = _alias_lease(store, cfg, "migrate")
    try:
        registry.set_alias(CANDIDATE, version)
        registry.tag_version(version, {"embray.candidate_at": utcnow(), "embray.candidate_by": who()})
    finally:
        lease.release()


def promote(
    cfg: Config, version: str, *, reason: str = "", force: bool = False, queries: str | None = None
) -> dict[str, Any]:
    """Move ``active`` to ``version`` once it passes the gates (:func:`embray.quality.check_gates`).

    ``force`` overrides the quality gates (recall, nDCG) and needs a ``reason``, which is recorded;
    it never overrides verify: a version with missing or corrupt files cannot be served.
    """
    from embray.quality import check_gates, log_result, result_tags

    if force and not reason.strip():
        raise ConfigError("--force needs --reason TEXT: say why the gates are overridden (it is recorded in MLflow)")
    store = Store(cfg.store.uri, cfg.store.storage_options)
    result = check_gates(cfg, version, queries=queries)
    failed = [g for g in result["gates"] if not g["passed"]]
    summary = "; ".join(f"{g['gate']}: {g['detail']}" for g in failed)
    if failed and (not force or failed[0]["gate"] == "verify"):
        hint = "repair or rebuild it" if failed[0]["gate"] == "verify" else "or override with --force --reason TEXT"
        raise GateError(f"refusing to promote {version}: {len(failed)} gate(s) failed: {summary}; {hint}")
    registry = Registry(cfg)
    gates = [{k: g.get(k) for k in ("gate", "passed", "value", "threshold")} for g in result["gates"]]
    tags = {"embray.gates": json.dumps(gates), "embray.promote_forced": "true" if failed else "false"}
    tags.update(result_tags("eval", result["eval"]))
    before = set_active(cfg, store, registry, version, reason=reason or "promoted", action="promote", tags=tags)
    try:
        log_result(cfg, read_manifest(store, cfg.collection, version).mlflow_run_id, "eval", result["eval"])
    except EmbrayError as e:  # the tags hold the same numbers; a metric point is not worth failing a promotion
        log.warning("eval metrics of %s not logged to its run: %s", version, e)
    if failed:
        log.warning("promote %s forced past failed gates (%s): %s", version, reason, summary)
    return {"active": version, "previous": before, "gates": result["gates"], "forced": bool(failed)}


def rollback(cfg: Config, *, reason: str = "") -> dict[str, Any]:
    """Move ``active`` back to the version that was active before the current one."""
    store = Store(cfg.store.uri, cfg.store.storage_options)
    registry = Registry(cfg)
    lease = _alias_lease(store, cfg, "rollback")
    try:
        current = registry.aliases().get(ACTIVE)
        committed = set(list_version_dirs(store, cfg.collection)[0])
        history = [v for v in _history(registry) if v in committed]
        if current in history:
            history = history[: history.index(current)]
        if not history:
            raise VersionError(
                f"collection {cfg.collection!r} has no earlier active version to roll back to (active: {current}); "
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
    return {"active": target, "previous": current}


# --- garbage collection ------------------------------------------------------------------


def _old_scratch(store: Store, collection: str, older_than_s: float = 3600) -> list[str]:
    """Scratch directories of dry runs (named like version ids, so by start time) older than an hour."""
    import datetime as dt

    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than_s)
    old = []
    for name in store.listdir(f"{collection}/{SCRATCH}"):
        try:
            started = dt.datetime.strptime(name[1:16], "%Y%m%dT%H%M%S").replace(tzinfo=dt.timezone.utc)
        except ValueError:
            continue  # not ours
        if started < cutoff:
            old.append(name)
    return old


def gc(cfg: Config, *, keep: int, dry_run: bool = False) -> dict[str, Any]:
    """Delete old versions no alias points at and no kept version reuses files of; and failed builds."""
    if keep < 1:
        raise VersionError("--keep must be at least 1")
    store = Store(cfg.store.uri, cfg.store.storage_options)
    registry = Registry(cfg)
    with Lease(store, cfg.collection, WRITER, job="gc"):
        committed, uncommitted = list_version_dirs(store, cfg.collection)
        manifests = {v: read_manifest(store, cfg.collection, v) for v in committed}
        aliased = {v for v in registry.aliases().values() if v}
        newest = sorted(committed, key=lambda v: (manifests[v].created, v))[-keep:]
        kept = set(newest) | (aliased & set(committed))
        todo = list(kept)
        while todo:  # keep whatever a kept version reuses files from, transitively
            for ref in manifests[todo.pop()].referenced_versions():
                if ref not in kept and ref in manifests:
                    kept.add(ref)
                    todo.append(ref)
        delete = [v for v in committed if v not in kept]
        live_fps = {manifests[v].fingerprint for v in kept}
        caches = [fp for fp in store.listdir(f"{cfg.collection}/cache") if fp not in live_fps]
        scratch = _old_scratch(store, cfg.collection)
        out = {
            "kept": sorted(kept),
            "deleted": delete,
            "unfinished": uncommitted,  # builds that failed or were killed: no manifest, never visible
            "caches": caches,
            "scratch": scratch,  # dry runs (status) killed more than an hour ago
            "dry_run": dry_run,
        }
        if dry_run:
            return out
        for v in delete:
            vdir = version_dir(cfg.collection, v)
            store.delete(f"{vdir}/{MANIFEST}")  # invisible first, then the files
            store.delete(vdir)
            try:
                registry.delete_version(v)
            except EmbrayError as e:
                log.warning("deleted %s but could not remove its MLflow model version: %s", v, e)
        for v in uncommitted:
            store.delete(version_dir(cfg.collection, v))
        for fp in caches:
            store.delete(f"{cfg.collection}/cache/{fp}")
        for name in scratch:
            store.delete(f"{cfg.collection}/{SCRATCH}/{name}")
    log.info(
        "gc %s: kept %d, deleted %d versions, %d unfinished builds, %d caches",
        cfg.collection,
        len(kept),
        len(delete),
        len(uncommitted),
        len(caches),
    )
    return out
