"""Backfill: a full build of a collection into a new, immutable version.

    read corpus -> content hash, rejects, shard per row -> embed (actor pool)
    -> staged parts by shard -> one task per shard: dedupe, sort, embeddings part
    + USearch shard -> manifest (create-only) -> MLflow model version (+ alias)

Nothing is visible until the manifest is committed; a failure deletes the
staged files and marks the MLflow run FAILED.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from embray import rows as R
from embray.config import Config, IndexConfig, RayConfig
from embray.errors import ConfigError, EmbrayError, ModelError, SourceError, StoreError
from embray.models import ModelSpec, fingerprint
from embray.registry import ACTIVE, Registry
from embray.source import SourceInfo, inspect_source
from embray.store import Store, local_tmpdir
from embray.versions import (
    FileEntry,
    Manifest,
    ShardEntry,
    commit_manifest,
    list_versions,
    new_version_id,
    utcnow,
    version_dir,
    who,
)

log = logging.getLogger("embray")

STAGING = "_staging"


@dataclass(frozen=True)
class BuildResult:
    version: str
    uri: str
    fingerprint: str
    rows: int
    rejected: int
    seconds: float
    model_version: str
    promoted: bool
    manifest: Manifest

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "uri": self.uri,
            "fingerprint": self.fingerprint,
            "rows": self.rows,
            "rejected": self.rejected,
            "rejected_by_reason": self.manifest.counts.get("by_reason", {}),
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows / self.seconds, 1) if self.seconds else None,
            "model_version": self.model_version,
            "aliases": [ACTIVE] if self.promoted else [],
        }


def init_ray(rc: RayConfig) -> None:
    """Connect to the configured Ray cluster, or start a local one (once per process)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True, "include_dashboard": False}
    if rc.address:
        kwargs["address"] = rc.address
    elif rc.num_cpus:
        kwargs["num_cpus"] = rc.num_cpus
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise ConfigError(f"ray.address {rc.address!r}: cannot connect ({e}); check the address or use null") from e


# --- stage 1: rows ------------------------------------------------------------

def _prepare(batch, *, id_col: str, text_col: str, shards: int):
    """Normalise column names, hash content, assign shards, and mark rows that cannot be embedded."""
    import pyarrow as pa

    ids = batch.column(id_col).to_pylist()
    texts = batch.column(text_col).to_pylist()
    reasons = [R.reject_reason(i, t) for i, t in zip(ids, texts, strict=True)]
    hashes = [R.content_hash(t) if r is None else None for t, r in zip(texts, reasons, strict=True)]
    shard = [R.shard_of(i, shards) if i is not None else 0 for i in ids]
    return pa.table(
        {
            "id": batch.column(id_col),
            "text": batch.column(text_col).cast(pa.string()),
            "content_hash": pa.array(hashes, pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "path": batch.column("path"),
            "shard": pa.array(shard, pa.int32()),
        }
    )


class _EmbedActor:
    """One model replica in the Ray Data actor pool: loads lazily, refuses foreign weights."""

    def __init__(self, spec: ModelSpec, expected_fingerprint: str, threads: int | None):
        from embray.models import load_embedder

        if spec.backend != "hash":
            import torch

            torch.set_num_threads(threads or os.cpu_count() or 1)
        got = fingerprint(spec)
        if got != expected_fingerprint:
            raise ModelError(
                f"worker {socket.gethostname()} resolved {spec.label} to fingerprint {got}, but the job embeds "
                f"{expected_fingerprint}: its weights differ; give every node the same model files"
            )
        self.embedder = load_embedder(spec)

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        ok = pc.is_null(batch.column("reason"))
        ok_np = ok.to_numpy(zero_copy_only=False)
        texts = batch.column("text").filter(ok).to_pylist()
        dims = self.embedder.dims
        full = np.zeros((batch.num_rows, dims), dtype=np.float32)
        if texts:
            full[ok_np] = self.embedder.embed_documents(texts)
        # Rejected rows keep a zero vector; the text stays so that rejects (duplicates are only found
        # per shard, later) can be written with it.
        return batch.append_column("vector", pa.FixedSizeListArray.from_arrays(pa.array(full.ravel()), dims))


# --- stage 2: shards ------------------------------------------------------------

def _sha256(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _vectors(column, dims: int):
    import numpy as np
    import pyarrow as pa

    col = column.combine_chunks()
    if isinstance(col.type, pa.ExtensionType):
        col = col.storage
    if len(col) == 0:
        return np.zeros((0, dims), dtype=np.float32)
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dims)


def build_shard(
    store: Store, staged: str, vdir: str, shard: int, dims: int, index_cfg: IndexConfig, fp: str
) -> tuple[dict, dict[str, int]]:
    """Turn one shard's staged rows into its embeddings part, USearch index and rejects file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from usearch.index import Index

    pa_fs = store.pyarrow_fs()
    names = [n for n in store.listdir(f"{staged}/shard={shard}") if n.endswith(".parquet")]
    tables = [pq.read_table(store.path(f"{staged}/shard={shard}/{n}"), filesystem=pa_fs) for n in names]
    table = pa.concat_tables(tables, promote_options="permissive") if tables else None

    ids = table.column("id").to_pylist() if table is not None else []
    reasons = table.column("reason").to_pylist() if table is not None else []
    dups = R.duplicate_ids(ids)
    for i, row_id in enumerate(ids):
        if reasons[i] is None and row_id in dups:
            reasons[i] = f"{R.DUPLICATE_ID} ({dups[row_id]} rows share it)"
    tmp = local_tmpdir("embray-shard-")
    entry: dict[str, Any] = {"shard": shard, "fingerprint": fp, "embeddings": None, "index": None, "rejects": None}
    by_reason: dict[str, int] = {}

    def _put(local: str, rel: str) -> dict:
        sha, size = _sha256(local)
        store.upload(local, f"{vdir}/{rel}")
        return FileEntry(path=rel, sha256=sha, bytes=size).model_dump()

    if table is not None:
        reason_arr = pa.array(reasons, pa.string())
        bad = table.filter(pc.is_valid(reason_arr)).select(["id", "text", "path"])
        if bad.num_rows:
            bad = bad.append_column("reason", pa.array([r for r in reasons if r is not None], pa.string()))
            for r in bad.column("reason").to_pylist():
                key = R.DUPLICATE_ID if r.startswith(R.DUPLICATE_ID) else r
                by_reason[key] = by_reason.get(key, 0) + 1
            local = str(tmp / "rejects.parquet")
            pq.write_table(bad, local)
            entry["rejects"] = _put(local, f"rejects/shard-{shard:05d}.parquet")
        good = table.filter(pc.is_null(reason_arr)).sort_by("id")
    else:
        good = None

    n = good.num_rows if good is not None else 0
    meta = {b"embray.fingerprint": fp.encode(), b"embray.shard": str(shard).encode()}
    if n:
        vectors = _vectors(good.column("vector"), dims)
        ids_col, hashes = good.column("id"), good.column("content_hash")
    else:
        vectors = np.zeros((0, dims), dtype=np.float32)
        ids_col, hashes = pa.array([], pa.string()), pa.array([], pa.string())
    part = pa.table(
        {
            "id": ids_col,
            "content_hash": hashes,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), dims),
        }
    ).replace_schema_metadata(meta)
    local = str(tmp / "embeddings.parquet")
    pq.write_table(part, local)
    entry["embeddings"] = _put(local, f"embeddings/shard-{shard:05d}.parquet")

    index = Index(
        ndim=dims,
        metric=index_cfg.metric,
        dtype=index_cfg.dtype,
        connectivity=index_cfg.connectivity,
        expansion_add=index_cfg.expansion_add,
        expansion_search=index_cfg.expansion_search,
    )
    if n:
        index.add(np.arange(n, dtype=np.uint64), vectors)
    local = str(tmp / "index.usearch")
    index.save(local)
    entry["index"] = _put(local, f"shards/shard-{shard:05d}.usearch")
    entry["rows"] = n
    entry["rejected"] = sum(by_reason.values())
    entry["content_digest"] = R.digest_pairs(ids_col.to_pylist(), hashes.to_pylist())
    os.rmdir(tmp)
    return ShardEntry(**entry).model_dump(), by_reason


# --- the job --------------------------------------------------------------------

def _check_pool_fits(cfg: Config) -> None:
    import ray

    if cfg.ray.address:
        return  # a cluster may autoscale: let Ray place the actors
    cpus = ray.cluster_resources().get("CPU", 0)
    need = cfg.embed.actors * cfg.embed.num_cpus
    if cfg.embed.num_gpus == 0 and need >= cpus:
        raise ConfigError(
            f"embed.actors x embed.num_cpus = {need:g} CPUs, but this local Ray has {cpus:g}: reads and writes "
            "would get no CPU and the job would hang; lower embed.actors or embed.num_cpus"
        )


def _embed_and_stage(cfg: Config, src: SourceInfo, store: Store, staged: str, fp: str) -> None:
    """Run the Ray Data pipeline: every input row lands in its shard's staging directory."""
    import ray
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ds = ray.data.read_parquet(
        src.files,
        filesystem=src.store.pyarrow_fs(),
        columns=[cfg.source.id_column, cfg.source.text_column],
        include_paths=True,
        partitioning=None,
    )
    ds = ds.map_batches(
        _prepare,
        batch_format="pyarrow",
        fn_kwargs={"id_col": cfg.source.id_column, "text_col": cfg.source.text_column, "shards": cfg.index.shards},
    )
    ds = ds.map_batches(
        _EmbedActor,
        batch_format="pyarrow",
        batch_size=cfg.embed.batch_size,
        compute=ActorPoolStrategy(size=cfg.embed.actors),
        num_cpus=cfg.embed.num_cpus,
        num_gpus=cfg.embed.num_gpus,
        fn_constructor_kwargs={"spec": cfg.model, "expected_fingerprint": fp, "threads": cfg.embed.threads},
    )
    ds.write_parquet(store.path(staged), filesystem=store.pyarrow_fs(), partition_cols=["shard"])


def _staged_dims(store: Store, staged: str) -> int:
    """The vector size the actors produced, read from one staged file's schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for part in store.listdir(staged):
        names = [n for n in store.listdir(f"{staged}/{part}") if n.endswith(".parquet")]
        if names:
            schema = pq.read_schema(store.path(f"{staged}/{part}/{names[0]}"), filesystem=store.pyarrow_fs())
            vtype = schema.field("vector").type
            if isinstance(vtype, pa.ExtensionType):
                vtype = vtype.storage_type
            return int(vtype.list_size)
    raise SourceError("the source corpus has no rows; add data to source.uri before a backfill")


def _wrap(e: Exception, stage: str, kind: type[EmbrayError]) -> EmbrayError:
    """Ray wraps task errors; surface ours, and name the stage for the rest."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, EmbrayError):
        return cause
    last = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
    return kind(f"the backfill failed while {stage}: {type(cause).__name__}: {last}")


def backfill(cfg: Config, *, promote: bool = True) -> BuildResult:
    """Build a new version of ``cfg.collection`` from its whole source. See the module docstring."""
    t0 = time.monotonic()
    fp = fingerprint(cfg.model)
    store = Store(cfg.store.uri, cfg.store.storage_options)
    store.check_writable()
    src = inspect_source(cfg.source)
    registry = Registry(cfg)
    sync_registry(store, registry, cfg.collection)  # also fails fast when MLflow is unreachable

    vid = new_version_id()
    vdir = version_dir(cfg.collection, vid)
    log.info("backfill %s: %d files from %s -> %s", vid, len(src.files), cfg.source.uri, store.url(vdir))
    run_id = registry.start_run(
        vid,
        "backfill",
        {
            "collection": cfg.collection,
            "version": vid,
            "model": cfg.model.label,
            "backend": cfg.model.backend,
            "fingerprint": fp,
            "corpus_uri": cfg.source.uri,
            "corpus_files": len(src.files),
            "store_uri": cfg.store.uri,
            "index.metric": cfg.index.metric,
            "index.dtype": cfg.index.dtype,
            "index.shards": cfg.index.shards,
            "embed.batch_size": cfg.embed.batch_size,
            "embed.actors": cfg.embed.actors,
        },
    )
    registry.log_corpus(run_id, cfg.source.uri, src.digest, {"id": src.id_type, "text": "string"})
    try:
        import ray

        init_ray(cfg.ray)
        _check_pool_fits(cfg)
        staged = f"{vdir}/{STAGING}"
        t_embed = time.monotonic()
        try:
            _embed_and_stage(cfg, src, store, staged, fp)
        except Exception as e:  # noqa: BLE001 - re-raised as the matching EmbrayError
            raise _wrap(e, "reading or embedding the corpus", SourceError) from e
        embed_s = time.monotonic() - t_embed
        dims = _staged_dims(store, staged)
        log.info("embedded and staged in %.1fs; building %d shards", embed_s, cfg.index.shards)
        task = ray.remote(num_cpus=1)(build_shard)
        try:
            results = ray.get(
                [task.remote(store, staged, vdir, k, dims, cfg.index, fp) for k in range(cfg.index.shards)]
            )
        except Exception as e:  # noqa: BLE001 - re-raised as the matching EmbrayError
            raise _wrap(e, "building the shards", StoreError) from e
        store.delete(staged)
        shards = [ShardEntry(**r) for r, _ in results]
        by_reason: dict[str, int] = {}
        for _, counts in results:
            for k, v in counts.items():
                by_reason[k] = by_reason.get(k, 0) + v
        rows = sum(s.rows for s in shards)
        rejected = sum(s.rejected for s in shards)
        seconds = time.monotonic() - t0
        manifest = Manifest(
            collection=cfg.collection,
            version=vid,
            created=utcnow(),
            created_by=who(),
            model=cfg.model,
            fingerprint=fp,
            dims=dims,
            index=cfg.index.model_dump(),
            source={
                "uri": cfg.source.uri,
                "id_column": cfg.source.id_column,
                "text_column": cfg.source.text_column,
                "files": len(src.files),
                "digest": src.digest,
                "id_type": src.id_type,
            },
            counts={"input_rows": rows + rejected, "rows": rows, "rejected": rejected, "by_reason": by_reason},
            shards=shards,
            content_digest=hashlib.sha256("".join(s.content_digest for s in shards).encode()).hexdigest(),
            stats={"seconds": round(seconds, 3), "embed_seconds": round(embed_s, 3)},
            mlflow_run_id=run_id,
        )
        uri = commit_manifest(store, manifest)
    except BaseException as e:
        _abandon(store, vdir, registry, run_id, e)
        raise
    log.info("committed %s: %d rows, %d rejected, %.1fs", vid, rows, rejected, seconds)

    registry.log_metrics(
        run_id,
        {
            "rows": rows,
            "rejected": rejected,
            "input_rows": rows + rejected,
            "seconds": seconds,
            "embed_seconds": embed_s,
            "rows_per_s": rows / seconds if seconds else 0.0,
            **{f"rejected.{k.replace(' ', '_')}": v for k, v in by_reason.items()},
        },
    )
    registry.end_run(run_id, ok=True)
    model_version = registry.register(manifest, uri)
    promoted = False
    if promote and ACTIVE not in registry.aliases():
        registry.set_alias(ACTIVE, vid)
        promoted = True
    return BuildResult(vid, uri, fp, rows, rejected, seconds, model_version, promoted, manifest)


def _abandon(store: Store, vdir: str, registry: Registry, run_id: str, e: BaseException) -> None:
    """Remove what a failed build wrote and record the failure; never hides the original error."""
    log.error("backfill failed (%s); removing %s", e, store.url(vdir))
    try:
        store.delete(vdir)
    except EmbrayError as cleanup:
        log.error("could not remove %s: %s (it has no manifest, so it is not visible)", store.url(vdir), cleanup)
    try:
        registry.end_run(run_id, ok=False, error=f"{type(e).__name__}: {e}")
    except EmbrayError as mlflow_error:
        log.error("could not mark MLflow run %s failed: %s", run_id, mlflow_error)


def sync_registry(store: Store, registry: Registry, collection: str) -> None:
    """Register committed versions that MLflow does not know yet (after a crash between commit and register)."""
    known = registry.registered_versions()
    for m in list_versions(store, collection):
        if m.version not in known:
            log.warning("registering %s, committed earlier but missing from MLflow", m.version)
            registry.register(m, store.url(version_dir(collection, m.version)))
