"""Builds: every new version (backfill, refresh, migration) goes through one pipeline.

    scan    one Ray task per source file: content hash, reject reason and shard of every row
    plan    one Ray task per shard: reject duplicate ids, diff against the parent version by content
            hash, look up the vector cache, write the texts still to embed in chunks
    embed   Ray Data actor pool over those chunks; each finished chunk becomes one file of the vector
            cache, keyed by (fingerprint, content_hash), written whole or not at all
    shards  one Ray task per shard: reuse an unchanged parent shard by reference, update a changed one
            in place (USearch remove + add), or build it fresh -> embeddings part + USearch index
    commit  manifest last, create-only -> MLflow metrics, model version

Crash safety: nothing is visible before the manifest is committed. Embedded chunks stay in the
cache from the moment they finish, so a rerun after a kill finds them and embeds only what is left;
scan, plan and shards are cheap next to embedding and are simply redone. The result equals an
uninterrupted build's: the same ids, content hashes and vectors.

Store layout used here (beside ``versions/``, see :mod:`embray.versions`)::

    <collection>/cache/<fingerprint>/shard-00003-of-00004/<chunk digest>.parquet   content_hash, vector
    <collection>/versions/<version>/_staging/{scan,plan,need}/...                   deleted on commit
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from embray import rows as R
from embray.config import Config, IndexConfig, RayConfig
from embray.errors import ConfigError, EmbrayError, ModelError, SourceError, StoreError, VersionError
from embray.models import ModelSpec, fingerprint
from embray.registry import Registry
from embray.source import SourceInfo, inspect_source
from embray.store import Store, local_tmpdir, sha256_of
from embray.versions import (
    FileEntry,
    Manifest,
    ShardEntry,
    commit_manifest,
    file_rel,
    new_version_id,
    utcnow,
    version_dir,
    who,
)

log = logging.getLogger("embray")

STAGING = "_staging"
SCRATCH = "_scratch"
# An in-place shard update stays cheaper and as good as a rebuild while the change is small.
INCREMENTAL_MAX_CHANGE = 0.25
# Up to this many embed.batch_size batches are embedded in one Ray task rather than an actor pool.
SMALL_EMBED_BATCHES = 4
COUNTS = ("new", "changed", "deleted", "reused", "embedded", "cache_hits")


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


def cache_dir(collection: str, fp: str, shard: int, shards: int) -> str:
    return f"{collection}/cache/{fp}/shard-{shard:05d}-of-{shards:05d}"


def _parquet_names(store: Store, rel: str) -> list[str]:
    return [n for n in store.listdir(rel) if n.endswith(".parquet") and not n.startswith(".")]


def _sha256(path: str) -> tuple[str, int]:
    with open(path, "rb") as fh:
        return sha256_of(fh)


def _vectors(column, dims: int):
    import numpy as np
    import pyarrow as pa

    col = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if isinstance(col.type, pa.ExtensionType):
        col = col.storage
    if len(col) == 0:
        return np.zeros((0, dims), dtype=np.float32)
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dims)


def _vector_array(vectors, dims: int):
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), dims)


# --- stage 1: scan -------------------------------------------------------------------


UPDATED_AT = "updated_at"  # staging column: when the source says a row last changed (UTC), or null


def _updated_at(batch, col: str | None):
    """The source's change time of each row as UTC timestamps; nulls when the column is absent or not a time."""
    import pyarrow as pa

    utc = pa.timestamp("us", tz="UTC")
    if col and col in batch.schema.names:
        arr = batch.column(col)
        if pa.types.is_timestamp(arr.type):  # naive times are read as UTC; nanoseconds are truncated
            return arr.cast(pa.timestamp(arr.type.unit, tz=arr.type.tz or "UTC")).cast(utc, safe=False)
        if pa.types.is_date(arr.type):
            return arr.cast(pa.timestamp("us")).cast(utc)
    return pa.nulls(batch.num_rows, utc)


def _prepare(batch, *, id_col: str, text_col: str, shards: int, url: str, updated_col: str | None = None):
    """Hash content, assign shards, and mark rows that cannot be embedded."""
    import pyarrow as pa

    ids = batch.column(id_col).to_pylist()
    texts = batch.column(text_col).to_pylist()
    reasons = [R.reject_reason(i, t) for i, t in zip(ids, texts, strict=True)]
    hashes = [R.content_hash(t) if r is None else None for t, r in zip(texts, reasons, strict=True)]
    return pa.table(
        {
            "id": batch.column(id_col),
            "text": batch.column(text_col).cast(pa.string()),
            "content_hash": pa.array(hashes, pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "path": pa.array([url] * len(ids), pa.string()),
            UPDATED_AT: _updated_at(batch, updated_col),
            "shard": pa.array([R.shard_of(i, shards) if i is not None else 0 for i in ids], pa.int32()),
        }
    )


def scan_file(
    src: SourceInfo,
    index: int,
    id_col: str,
    text_col: str,
    shards: int,
    store: Store,
    staged: str,
    updated_col: str | None = None,
) -> int:
    """Read one source file in row batches; write its rows to per-shard staging files. Returns rows read."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = src.files[index]
    url = src.url(path)
    tmp = local_tmpdir("embray-scan-")
    writers: dict[int, pq.ParquetWriter] = {}
    rows = 0
    try:
        try:
            pf = pq.ParquetFile(src.store.pyarrow_fs().open_input_file(path))
            columns = [id_col, text_col]
            if updated_col and updated_col in pf.schema_arrow.names and updated_col not in columns:
                columns.append(updated_col)
            for batch in pf.iter_batches(batch_size=65536, columns=columns):
                table = _prepare(
                    batch, id_col=id_col, text_col=text_col, shards=shards, url=url, updated_col=updated_col
                )
                rows += table.num_rows
                for k in pc.unique(table.column("shard")).to_pylist():
                    part = table.filter(pc.equal(table.column("shard"), pa.scalar(k, pa.int32()))).drop(["shard"])
                    if k not in writers:
                        writers[k] = pq.ParquetWriter(str(tmp / f"{k}.parquet"), part.schema)
                    writers[k].write_table(part.cast(writers[k].schema))
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            raise SourceError(f"{url} cannot be read as Parquet ({type(e).__name__}: {e}); repair or remove it") from e
        for k, w in writers.items():
            w.close()
            store.upload(str(tmp / f"{k}.parquet"), f"{staged}/scan/shard-{k:05d}/f{index:06d}.parquet")
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return rows


# --- stage 2: plan -------------------------------------------------------------------


@dataclass(frozen=True)
class ParentShard:
    """What a build may take from its parent's shard: only ever from the same vector space."""

    version: str
    entry: ShardEntry
    embeddings_rel: str | None
    index_rel: str | None
    index_cfg: dict[str, Any]


def _read_table(store: Store, rel: str, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    return pq.read_table(store.path(rel), filesystem=store.pyarrow_fs(), columns=columns)


def _cached_hashes(store: Store, cdir: str, fp: str) -> dict[str, str]:
    """content_hash -> cache file name, for every readable cache file of one shard."""
    import pyarrow.parquet as pq

    out: dict[str, str] = {}
    for name in _parquet_names(store, cdir):
        try:
            pf = pq.ParquetFile(store.pyarrow_fs().open_input_file(store.path(f"{cdir}/{name}")))
            meta = pf.schema_arrow.metadata or {}
            if meta.get(b"embray.fingerprint", b"").decode() != fp:
                log.error("%s is not from fingerprint %s; ignoring it", store.url(cdir, name), fp)
                continue
            for h in pf.read(columns=["content_hash"]).column("content_hash").to_pylist():
                out[h] = name
        except Exception as e:  # noqa: BLE001 - a damaged cache file is only a cache miss
            log.warning("ignoring unreadable cache file %s: %s", store.url(cdir, name), e)
    return out


def plan_shard(
    store: Store,
    staged: str,
    vdir: str,
    shard: int,
    parent: ParentShard | None,
    cdir: str,
    fp: str,
    chunk_rows: int,
    dry_run: bool,
) -> dict[str, Any]:
    """Decide, for one shard, which rows are rejected, reused, or still to embed."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    names = _parquet_names(store, f"{staged}/scan/shard-{shard:05d}")
    tables = [_read_table(store, f"{staged}/scan/shard-{shard:05d}/{n}") for n in names]
    table = (
        pa.concat_tables(tables, promote_options="permissive")
        if tables
        else pa.table(
            {
                "id": pa.array([], pa.string()),
                "text": pa.array([], pa.string()),
                "content_hash": pa.array([], pa.string()),
                "reason": pa.array([], pa.string()),
                "path": pa.array([], pa.string()),
            }
        )
    )
    ids = table.column("id").to_pylist()
    reasons = table.column("reason").to_pylist()
    dups = R.duplicate_ids(ids)
    for i, row_id in enumerate(ids):
        if reasons[i] is None and row_id in dups:
            reasons[i] = f"{R.DUPLICATE_ID} ({dups[row_id]} rows share it)"
    reason_arr = pa.array(reasons, pa.string())
    out: dict[str, Any] = {"shard": shard, "rejects": None, "by_reason": {}, "need": []}

    bad = table.filter(pc.is_valid(reason_arr)).select(["id", "text", "path"])
    if bad.num_rows:
        bad = bad.append_column("reason", reason_arr.filter(pc.is_valid(reason_arr)))
        for r in bad.column("reason").to_pylist():
            key = R.DUPLICATE_ID if r.startswith(R.DUPLICATE_ID) else r
            out["by_reason"][key] = out["by_reason"].get(key, 0) + 1
        if not dry_run:
            tmp = local_tmpdir("embray-rejects-")
            local = str(tmp / "rejects.parquet")
            pq.write_table(bad, local)
            sha, size = _sha256(local)
            rel = f"rejects/shard-{shard:05d}.parquet"
            store.upload(local, f"{vdir}/{rel}")
            tmp.rmdir()
            out["rejects"] = FileEntry(path=rel, sha256=sha, bytes=size).model_dump()
    good = table.filter(pc.is_null(reason_arr)).sort_by("id")
    g_ids = good.column("id").to_pylist()
    g_hashes = good.column("content_hash").to_pylist()
    g_texts = good.column("text")

    old: dict[Any, tuple[str, int]] = {}
    if parent is not None and parent.embeddings_rel:
        p = _read_table(store, parent.embeddings_rel, ["id", "key", "content_hash"])
        old = dict(
            zip(
                p.column("id").to_pylist(),
                zip(p.column("content_hash").to_pylist(), p.column("key").to_pylist(), strict=True),
                strict=True,
            )
        )
    parent_hashes = {h for h, _ in old.values()}
    cached = _cached_hashes(store, cdir, fp)

    updated = (
        good.column(UPDATED_AT).cast("int64").to_pylist() if UPDATED_AT in good.schema.names else [None] * len(g_ids)
    )
    oldest_stale: int | None = None  # microseconds since the epoch of the earliest change not in the parent
    status, parent_keys, todo = [], [], {}
    counts = dict.fromkeys(COUNTS, 0)
    for i, (row_id, h) in enumerate(zip(g_ids, g_hashes, strict=True)):
        prev = old.get(row_id)
        if prev is not None and prev[0] == h:
            status.append("same")
            parent_keys.append(prev[1])
            counts["reused"] += 1
            continue
        status.append("changed" if prev is not None else "new")
        parent_keys.append(prev[1] if prev is not None else None)
        counts[status[-1]] += 1
        if updated[i] is not None and (oldest_stale is None or updated[i] < oldest_stale):
            oldest_stale = updated[i]
        if h in parent_hashes or h in cached:
            counts["cache_hits"] += 1
        elif h not in todo:
            todo[h] = i
    counts["deleted"] = len(set(old) - set(g_ids))
    counts["embedded"] = len(todo)
    out.update(counts)
    out["rows"] = len(g_ids)
    out["rejected"] = bad.num_rows
    out["content_digest"] = R.digest_pairs(g_ids, g_hashes)
    out["unchanged"] = parent is not None and counts["new"] == counts["changed"] == counts["deleted"] == 0
    out["oldest_stale_us"] = oldest_stale
    if dry_run:
        return out

    plan = pa.table(
        {
            "id": good.column("id"),
            "content_hash": good.column("content_hash"),
            "status": pa.array(status, pa.string()),
            "parent_key": pa.array(parent_keys, pa.uint64()),
        }
    )
    tmp = local_tmpdir("embray-plan-")
    pq.write_table(plan, str(tmp / "plan.parquet"))
    store.upload(str(tmp / "plan.parquet"), f"{staged}/plan/shard-{shard:05d}.parquet")
    # Chunks of similar lengths: a model pads each batch to its longest text, so this wastes less compute.
    lengths = pc.utf8_length(g_texts).to_numpy(zero_copy_only=False)
    rows = sorted(todo.values(), key=lambda i: (lengths[i], i))
    for j in range(0, len(rows), chunk_rows):
        take = pa.array(rows[j : j + chunk_rows], pa.int64())
        chunk = pa.table({"content_hash": pc.take(good.column("content_hash"), take), "text": pc.take(g_texts, take)})
        digest = hashlib.sha256("".join(chunk.column("content_hash").to_pylist()).encode()).hexdigest()[:32]
        rel = f"{staged}/need/shard-{shard:05d}/{digest}.parquet"
        pq.write_table(chunk, str(tmp / "need.parquet"))
        store.upload(str(tmp / "need.parquet"), rel)
        out["need"].append({"need": rel, "cache": f"{cdir}/{digest}.parquet", "rows": chunk.num_rows})
    tmp.rmdir()
    return out


# --- stage 3: embed ------------------------------------------------------------------


class _EmbedChunks:
    """One model replica in the Ray Data actor pool; each call embeds whole chunks into the cache."""

    def __init__(self, spec: ModelSpec, expected_fingerprint: str, threads: int | None, store: Store):
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
        self.fp = got
        self.store = store
        self.embedder = load_embedder(spec)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        done = []
        for need, cache in zip(batch["need"], batch["cache"], strict=True):
            chunk = _read_table(self.store, str(need))
            vectors = self.embedder.embed_documents(chunk.column("text").to_pylist())
            table = pa.table(
                {"content_hash": chunk.column("content_hash"), "vector": _vector_array(vectors, vectors.shape[1])}
            ).replace_schema_metadata({b"embray.fingerprint": self.fp.encode()})
            tmp = local_tmpdir("embray-embed-")
            pq.write_table(table, str(tmp / "chunk.parquet"))
            self.store.upload(str(tmp / "chunk.parquet"), str(cache))  # whole or not at all: a rerun trusts it
            tmp.rmdir()
            done.append(chunk.num_rows)
        return {"rows": np.array(done, dtype=np.int64)}


def _embed_in_task(spec: ModelSpec, fp: str, threads: int | None, store: Store, chunks: list[dict]) -> int:
    embed = _EmbedChunks(spec, fp, threads, store)
    return int(embed({"need": [c["need"] for c in chunks], "cache": [c["cache"] for c in chunks]})["rows"].sum())


def embed_chunks(cfg: Config, spec: ModelSpec, fp: str, store: Store, chunks: list[dict]) -> int:
    """Embed every planned chunk into the cache; returns the rows embedded.

    Bulk work streams through a Ray Data actor pool. A handful of rows (a typical refresh) goes to one
    plain Ray task instead, in an already warm worker: the pool's start-up would cost more than the work.
    """
    import ray
    from ray.data import ActorPoolStrategy

    if not chunks:
        return 0
    if sum(c["rows"] for c in chunks) <= SMALL_EMBED_BATCHES * cfg.embed.batch_size:
        task = ray.remote(num_cpus=cfg.embed.num_cpus, num_gpus=cfg.embed.num_gpus)(_embed_in_task)
        return ray.get(task.remote(spec, fp, cfg.embed.threads, store, chunks))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ds = ray.data.from_items(
        [{"need": c["need"], "cache": c["cache"]} for c in chunks], override_num_blocks=len(chunks)
    ).map_batches(
        _EmbedChunks,
        batch_size=1,
        compute=ActorPoolStrategy(size=cfg.embed.actors),
        num_cpus=cfg.embed.num_cpus,
        num_gpus=cfg.embed.num_gpus,
        fn_constructor_kwargs={"spec": spec, "expected_fingerprint": fp, "threads": cfg.embed.threads, "store": store},
    )
    return sum(int(b["rows"].sum()) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))


# --- stage 4: shards -----------------------------------------------------------------


def _read_checked(store: Store, rel: str, fp: str, columns: list[str]):
    """Read a vectors file only if it carries fingerprint ``fp``; None (logged) when it does not or is damaged."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(store.pyarrow_fs().open_input_file(store.path(rel)))
        got = (pf.schema_arrow.metadata or {}).get(b"embray.fingerprint", b"").decode()
        if got != fp:
            log.error("%s holds fingerprint %r, not %s; not using it", store.url(rel), got, fp)
            return None
        return pf.read(columns=columns)
    except Exception as e:  # noqa: BLE001 - a damaged cache file is only a cache miss
        log.warning("ignoring unreadable %s: %s", store.url(rel), e)
        return None


def _lookup_vectors(store: Store, cdir: str, wanted: set[str], dims: int, fp: str, tables=()):
    """content_hash -> vector for ``wanted``, from the shard's cache files and then ``tables``.

    Every file is checked to carry ``fp``: a build never takes a vector from another space.
    """
    found: dict = {}
    sources = [f"{cdir}/{n}" for n in _parquet_names(store, cdir)] + list(tables)
    for src in sources:
        if len(found) == len(wanted):
            break
        t = _read_checked(store, src, fp, ["content_hash", "vector"]) if isinstance(src, str) else src
        if t is None:
            continue
        hashes = t.column("content_hash").to_pylist()
        hit = [i for i, h in enumerate(hashes) if h in wanted and h not in found]
        if hit:
            vecs = _vectors(t.column("vector"), dims)
            for i in hit:
                found[hashes[i]] = vecs[i]
    return found


def build_shard(
    store: Store,
    staged: str,
    vdir: str,
    shard: int,
    dims: int,
    index_cfg: IndexConfig,
    fp: str,
    plan: dict[str, Any],
    parent: ParentShard | None,
    cdir: str,
) -> dict[str, Any]:
    """Write one shard of the new version; returns its ShardEntry as a dict."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from usearch.index import Index

    entry: dict[str, Any] = {
        "shard": shard,
        "fingerprint": fp,
        "rows": plan["rows"],
        "rejected": plan["rejected"],
        "rejects": plan["rejects"],
        "content_digest": plan["content_digest"],
    }
    if plan["unchanged"] and parent is not None:  # same rows, same space: point at the parent's files
        pe = parent.entry
        for name in ("embeddings", "index"):
            f = getattr(pe, name)
            entry[name] = f.model_copy(update={"version": f.version or parent.version}).model_dump() if f else None
        entry["next_key"] = pe.next_key
        return entry

    p = _read_table(store, f"{staged}/plan/shard-{shard:05d}.parquet")
    n = p.num_rows
    hashes = p.column("content_hash").to_pylist()
    same = np.asarray(p.column("status").to_numpy(zero_copy_only=False) == "same", dtype=bool)
    change = plan["new"] + plan["changed"] + plan["deleted"]
    incremental = (
        parent is not None
        and parent.index_rel is not None
        and all(parent.index_cfg.get(k) == getattr(index_cfg, k) for k in ("metric", "dtype", "connectivity"))
        and change <= INCREMENTAL_MAX_CHANGE * max(parent.entry.rows, 1)
    )
    parent_part = None
    if parent is not None and parent.embeddings_rel:
        parent_part = _read_checked(store, parent.embeddings_rel, fp, ["key", "content_hash", "vector"])
        if parent_part is None:
            raise VersionError(f"shard {shard}: the parent's embeddings part cannot be used; run `embray verify`")
    wanted = {h for h, s in zip(hashes, same, strict=True) if not s} if incremental else set(hashes)
    found = _lookup_vectors(store, cdir, wanted, dims, fp, [parent_part] if parent_part is not None else [])
    missing = wanted - set(found)
    if missing:
        raise StoreError(
            f"shard {shard}: {len(missing)} vectors are missing from the cache {store.url(cdir)} after embedding; "
            "was it deleted while the build ran? rerun the command"
        )

    tmp = local_tmpdir("embray-shard-")
    index = Index(
        ndim=dims,
        metric=index_cfg.metric,
        dtype=index_cfg.dtype,
        connectivity=index_cfg.connectivity,
        expansion_add=index_cfg.expansion_add,
        expansion_search=index_cfg.expansion_search,
    )
    vectors = np.zeros((n, dims), dtype=np.float32)
    if incremental:
        # Keep the parent's graph: drop changed and deleted keys, add the new vectors under fresh keys.
        local_index = str(tmp / "parent.usearch")
        if store.remote:
            store.download(parent.index_rel, local_index)
        else:
            import shutil

            shutil.copyfile(store.path(parent.index_rel), local_index)
        index.load(local_index)
        os.unlink(local_index)
        p_keys = parent_part.column("key").to_numpy()
        keys = np.zeros(n, dtype=np.uint64)
        keys[same] = p.column("parent_key").filter(pa.array(same)).to_numpy()
        live = np.isin(p_keys, keys[same])
        if (~live).any():
            index.remove(p_keys[~live])
        fresh = np.flatnonzero(~same)
        next_key = parent.entry.next_key
        keys[fresh] = np.arange(next_key, next_key + len(fresh), dtype=np.uint64)
        next_key += len(fresh)
        order_p = np.argsort(p_keys)
        pos = order_p[np.searchsorted(p_keys[order_p], keys[same])]
        vectors[same] = _vectors(parent_part.column("vector"), dims)[pos]
        for i in fresh:
            vectors[i] = found[hashes[i]]
        if len(fresh):
            index.add(keys[fresh], vectors[fresh])
    else:
        keys = np.arange(n, dtype=np.uint64)
        next_key = n
        for i, h in enumerate(hashes):
            vectors[i] = found[h]
        if n:
            index.add(keys, vectors)

    order = np.argsort(keys, kind="stable")
    part = pa.table(
        {
            "id": p.column("id").take(pa.array(order)),
            "key": pa.array(keys[order], pa.uint64()),
            "content_hash": p.column("content_hash").take(pa.array(order)),
            "vector": _vector_array(vectors[order], dims),
        }
    ).replace_schema_metadata({b"embray.fingerprint": fp.encode(), b"embray.shard": str(shard).encode()})

    def _put(local: str, rel: str) -> dict:
        sha, size = _sha256(local)
        store.upload(local, f"{vdir}/{rel}")
        return FileEntry(path=rel, sha256=sha, bytes=size).model_dump()

    # Vectors barely compress; writing them raw is faster to write and to read back.
    pq.write_table(part, str(tmp / "embeddings.parquet"), compression="none")
    entry["embeddings"] = _put(str(tmp / "embeddings.parquet"), f"embeddings/shard-{shard:05d}.parquet")
    index.save(str(tmp / "index.usearch"))
    entry["index"] = _put(str(tmp / "index.usearch"), f"shards/shard-{shard:05d}.usearch")
    entry["next_key"] = int(next_key)
    entry["incremental"] = incremental
    tmp.rmdir()
    return entry


# --- the whole build -----------------------------------------------------------------


@dataclass
class BuildSpec:
    """What one build makes: its kind, model, and the version it derives from."""

    kind: str  # backfill | refresh | migrate
    model: ModelSpec
    parent: Manifest | None = None  # lineage; its vectors are reused only when its fingerprint is the model's
    dry_run: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None  # known already (a dry run against a version): skips hashing the weights


@dataclass(frozen=True)
class BuildResult:
    version: str | None
    uri: str | None
    fingerprint: str
    parent: str | None
    rows: int
    rejected: int
    counts: dict[str, int]
    seconds: float
    manifest: Manifest | None
    model_version: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def promoted(self) -> bool:
        return "active" in self.aliases

    def summary(self) -> dict[str, Any]:
        by_reason = self.manifest.counts.get("by_reason", {}) if self.manifest else self.counts.get("by_reason", {})
        return {
            "version": self.version,
            "parent": self.parent,
            "uri": self.uri,
            "fingerprint": self.fingerprint,
            "rows": self.rows,
            "rejected": self.rejected,
            "rejected_by_reason": by_reason,
            **{k: self.counts.get(k, 0) for k in COUNTS},
            **({"to_embed": self.counts["to_embed"]} if "to_embed" in self.counts else {}),
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows / self.seconds, 1) if self.seconds else None,
            "model_version": self.model_version,
            "aliases": list(self.aliases),
        }


def _check_pool_fits(cfg: Config) -> None:
    import ray

    if cfg.ray.address:
        return  # a cluster may autoscale: let Ray place the actors
    cpus = ray.cluster_resources().get("CPU", 0)
    need = cfg.embed.actors * cfg.embed.num_cpus
    if cfg.embed.num_gpus == 0 and need >= cpus:
        raise ConfigError(
            f"embed.actors x embed.num_cpus = {need:g} CPUs, but this local Ray has {cpus:g}: the scan and shard "
            "tasks would get no CPU and the job would hang; lower embed.actors or embed.num_cpus"
        )


def _gather(refs: list) -> list:
    """``ray.get`` of several tasks; when one fails, wait for the others to end before raising, so that
    nothing is still writing when the caller cleans up. (No ``ray.cancel``: in Ray 2.60 cancelling a task
    that is finishing can abort the driver, "Tried to complete task that was not pending".)"""
    import ray

    try:
        return ray.get(refs)
    except BaseException:
        ray.wait(refs, num_returns=len(refs), timeout=300)
        raise


def _stage(kind: str, stage: str, error: type[EmbrayError], fn, *args):
    """Run one stage; Ray wraps task errors, so surface ours and name the stage for the rest."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - re-raised as the matching EmbrayError
        cause = getattr(e, "cause", None) or e
        if isinstance(cause, EmbrayError):
            raise type(cause)(" ".join(str(cause).split())) from e
        last = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
        raise error(f"the {kind} failed while {stage}: {type(cause).__name__}: {last}") from e


def _parent_shards(store: Store, parent: Manifest | None, fp: str, shards: int) -> list[ParentShard | None]:
    if parent is None or parent.fingerprint != fp:
        return [None] * shards
    if len(parent.shards) != shards:
        raise ConfigError(
            f"index.shards is {shards} but version {parent.version} has {len(parent.shards)} shards; "
            f"set index.shards: {len(parent.shards)}, or build a new version from scratch with `embray backfill`"
        )
    out: list[ParentShard | None] = []
    for s in parent.shards:
        out.append(
            ParentShard(
                version=parent.version,
                entry=s,
                embeddings_rel=file_rel(parent, s.embeddings) if s.embeddings else None,
                index_rel=file_rel(parent, s.index) if s.index else None,
                index_cfg=dict(parent.index, dims=parent.dims),
            )
        )
    return out


def run_build(cfg: Config, spec: BuildSpec, registry: Registry | None, store: Store) -> BuildResult:
    """Build one version (or, with ``dry_run``, only plan it). The caller holds the writer lease."""
    import ray

    t0 = time.monotonic()
    fp = spec.fingerprint or fingerprint(spec.model)
    shards = cfg.index.shards
    src = inspect_source(cfg.source)
    parents = _parent_shards(store, spec.parent, fp, shards)
    vid = new_version_id()
    # A dry run writes only scratch files, outside versions/ (gc and listings never see it), and takes no lease.
    vdir = f"{cfg.collection}/{SCRATCH}/{vid}" if spec.dry_run else version_dir(cfg.collection, vid)
    staged = f"{vdir}/{STAGING}"
    kind = spec.kind
    log.info(
        "%s %s: %d files from %s -> %s%s",
        kind,
        vid,
        len(src.files),
        cfg.source.uri,
        store.url(vdir),
        f" (parent {spec.parent.version})" if spec.parent else "",
    )
    run_id = None
    if not spec.dry_run:
        run_id = registry.start_run(
            vid,
            kind,
            {
                "collection": cfg.collection,
                "version": vid,
                "parent": spec.parent.version if spec.parent else "",
                "model": spec.model.label,
                "backend": spec.model.backend,
                "fingerprint": fp,
                "corpus_uri": cfg.source.uri,
                "corpus_files": len(src.files),
                "store_uri": cfg.store.uri,
                "index.metric": cfg.index.metric,
                "index.dtype": cfg.index.dtype,
                "index.shards": shards,
                "embed.batch_size": cfg.embed.batch_size,
                "embed.actors": cfg.embed.actors,
                **spec.params,
            },
        )
        registry.log_corpus(run_id, cfg.source.uri, src.digest, {"id": src.id_type, "text": "string"})
    try:
        init_ray(cfg.ray)
        _check_pool_fits(cfg)
        scan = ray.remote(num_cpus=1)(scan_file)
        sc = cfg.source
        t = time.monotonic()
        input_rows = sum(
            _stage(
                kind,
                "reading the corpus",
                SourceError,
                _gather,
                [
                    scan.remote(src, i, sc.id_column, sc.text_column, shards, store, staged, sc.updated_at_column)
                    for i in range(len(src.files))
                ],
            )
        )
        cdirs = [cache_dir(cfg.collection, fp, k, shards) for k in range(shards)]
        plan_task = ray.remote(num_cpus=1)(plan_shard)
        plans = _stage(
            kind,
            "planning the shards",
            StoreError,
            _gather,
            [
                plan_task.remote(store, staged, vdir, k, parents[k], cdirs[k], fp, cfg.embed.batch_size, spec.dry_run)
                for k in range(shards)
            ],
        )
        counts: dict[str, Any] = {k: sum(p[k] for p in plans) for k in COUNTS}
        by_reason: dict[str, int] = {}
        for p in plans:
            for r, n in p["by_reason"].items():
                by_reason[r] = by_reason.get(r, 0) + n
        rows = sum(p["rows"] for p in plans)
        rejected = sum(p["rejected"] for p in plans)
        scan_s = time.monotonic() - t
        log.info(
            "%s %s planned in %.1fs: %d rows (%d rejected), %s",
            kind,
            vid,
            scan_s,
            rows,
            rejected,
            ", ".join(f"{k} {counts[k]}" for k in COUNTS),
        )
        if spec.dry_run:
            store.delete(vdir)
            counts["to_embed"], counts["embedded"] = counts["embedded"], 0  # planned; nothing was sent
            counts["by_reason"] = by_reason
            stale_us = [p["oldest_stale_us"] for p in plans if p["oldest_stale_us"] is not None]
            counts["oldest_stale_us"] = min(stale_us) if stale_us else None
            return BuildResult(
                None,
                None,
                fp,
                spec.parent.version if spec.parent else None,
                rows,
                rejected,
                counts,
                time.monotonic() - t0,
                None,
            )
        if rows == 0:
            raise SourceError(
                f"the source corpus {cfg.source.uri} has no embeddable rows "
                f"({rejected} rejected: {by_reason}); add data before a {kind}"
            )

        t = time.monotonic()
        chunks = [c for p in plans for c in p["need"]]
        embedded = _stage(kind, "embedding", ModelError, embed_chunks, cfg, spec.model, fp, store, chunks)
        embed_s = time.monotonic() - t
        log.info("%s %s: embedded %d rows in %.1fs", kind, vid, embedded, embed_s)
        counts["embedded"] = embedded
        dims = spec.parent.dims if parents[0] is not None else _cached_dims(store, chunks, cdirs, spec.model)

        t = time.monotonic()
        build = ray.remote(num_cpus=1)(build_shard)
        entries = _stage(
            kind,
            "building the shards",
            StoreError,
            _gather,
            [
                build.remote(store, staged, vdir, k, dims, cfg.index, fp, plans[k], parents[k], cdirs[k])
                for k in range(shards)
            ],
        )
        shard_s = time.monotonic() - t
        store.delete(staged)
        updated = sum(1 for e in entries if e.pop("incremental", False))
        reused_shards = sum(1 for p in plans if p["unchanged"] and parents[p["shard"]] is not None)
        seconds = time.monotonic() - t0
        manifest = Manifest(
            collection=cfg.collection,
            version=vid,
            parent=spec.parent.version if spec.parent else None,
            created=utcnow(),
            created_by=who(),
            model=spec.model,
            fingerprint=fp,
            dims=dims,
            index=cfg.index.model_dump(),
            source={
                "uri": cfg.source.uri,
                "id_column": sc.id_column,
                "text_column": sc.text_column,
                "files": len(src.files),
                "digest": src.digest,
                "id_type": src.id_type,
            },
            counts={
                "kind": kind,
                "input_rows": input_rows,
                "rows": rows,
                "rejected": rejected,
                "by_reason": by_reason,
                **{k: counts[k] for k in COUNTS},
                "shards_reused": reused_shards,
                "shards_updated": updated,
            },
            shards=[ShardEntry(**e) for e in entries],
            content_digest=hashlib.sha256("".join(e["content_digest"] for e in entries).encode()).hexdigest(),
            stats={
                "seconds": round(seconds, 3),
                "plan_seconds": round(scan_s, 3),
                "embed_seconds": round(embed_s, 3),
                "shard_seconds": round(shard_s, 3),
            },
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
            "input_rows": input_rows,
            "seconds": seconds,
            "embed_seconds": embed_s,
            "rows_per_s": rows / seconds if seconds else 0.0,
            **{k: counts[k] for k in COUNTS},
            "shards_reused": reused_shards,
            "shards_updated": updated,
            **{f"rejected.{k.replace(' ', '_')}": v for k, v in by_reason.items()},
        },
    )
    registry.end_run(run_id, ok=True)
    model_version = registry.register(manifest, uri)
    return BuildResult(
        vid, uri, fp, manifest.parent, rows, rejected, {k: counts[k] for k in COUNTS}, seconds, manifest, model_version
    )


def _cached_dims(store: Store, chunks: list[dict], cdirs: list[str], spec: ModelSpec) -> int:
    """The vector size the model produced, read from a cache file's schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rels = [c["cache"] for c in chunks[:1]] + [f"{d}/{n}" for d in cdirs for n in _parquet_names(store, d)]
    for rel in rels:
        try:
            vtype = pq.read_schema(store.path(rel), filesystem=store.pyarrow_fs()).field("vector").type
        except Exception as e:  # noqa: BLE001 - a damaged cache file is skipped here as everywhere
            log.debug("skipping %s: %s", rel, e)
            continue
        if isinstance(vtype, pa.ExtensionType):
            vtype = vtype.storage_type
        return int(vtype.list_size)
    if spec.dims:
        return spec.dims
    raise StoreError("no vectors were embedded or cached, so their size is unknown; rerun the command")


def _abandon(store: Store, vdir: str, registry: Registry | None, run_id: str | None, e: BaseException) -> None:
    """Remove what a failed build wrote and record the failure; never hides the original error.

    The vector cache is kept: it only ever holds finished chunks, and a rerun reuses them.
    """
    log.error("build failed (%s); removing %s", e, store.url(vdir))
    try:
        store.delete(vdir)
    except EmbrayError as cleanup:
        log.error("could not remove %s: %s (it has no manifest, so it is not visible)", store.url(vdir), cleanup)
    if run_id is None or registry is None:
        return
    try:
        registry.end_run(run_id, ok=False, error=f"{type(e).__name__}: {e}")
    except EmbrayError as mlflow_error:
        log.error("could not mark MLflow run %s failed: %s", run_id, mlflow_error)
