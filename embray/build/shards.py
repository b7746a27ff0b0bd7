"""Stage 4, shards: one Ray task per shard writes the embeddings part (id, key, content_hash, vector) and
a USearch index over the same uint64 keys. A shard with no change points at its parent's files; one
with a small change (<= INCREMENTAL_MAX_CHANGE) updates the parent's graph in place (remove changed and
deleted keys, add new vectors under fresh keys); any other is built from scratch."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from embray import layout
from embray.build.types import ParentShard, ShardBuild, ShardPlan
from embray.config import IndexConfig
from embray.errors import StoreError, VersionError
from embray.store import Store, local_tmpdir, sha256_file
from embray.vectors import read_checked, to_arrow, to_numpy, with_fingerprint
from embray.versions import FileEntry, ShardEntry

# An in-place shard update stays cheaper and as good as a rebuild while the change is small.
INCREMENTAL_MAX_CHANGE = 0.25
# A shard task reserves one CPU (pipeline.py); USearch would otherwise start a thread per core of the node,
# so eight shard tasks on a 64-core node would run 512 threads. Ray runs as many shard tasks as CPUs are free.
THREADS = 1


def lookup_vectors(store: Store, cdir: str, wanted: set[str], dims: int, fp: str, tables=()) -> dict[str, np.ndarray]:
    """content_hash -> vector for ``wanted``, from the shard's cache files and then ``tables``.

    Every file is checked to carry ``fp``: a build never takes a vector from another space.
    """
    found: dict[str, np.ndarray] = {}
    sources = [f"{cdir}/{n}" for n in store.parquet_names(cdir)] + list(tables)
    for src in sources:
        if len(found) == len(wanted):
            break
        t = read_checked(store, src, fp, ["content_hash", "vector"]) if isinstance(src, str) else src
        if t is None:
            continue
        hashes = t.column("content_hash").to_pylist()
        hit = [i for i, h in enumerate(hashes) if h in wanted and h not in found]
        if hit:
            vecs = to_numpy(t.column("vector"), dims)
            for i in hit:
                found[hashes[i]] = vecs[i]
    return found


def cached_dims(store: Store, chunks, cdirs: list[str], dims: int | None) -> int:
    """The vector size the model produced, read from a cache file's schema (``dims``: the spec's, if any)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rels = [c.cache for c in chunks[:1]] + [f"{d}/{n}" for d in cdirs for n in store.parquet_names(d)]
    for rel in rels:
        try:
            vtype = pq.read_schema(store.path(rel), filesystem=store.pyarrow_fs()).field("vector").type
        except Exception:  # noqa: BLE001 - a damaged cache file is skipped here as everywhere
            continue
        if isinstance(vtype, pa.ExtensionType):
            vtype = vtype.storage_type
        return int(vtype.list_size)
    if dims:
        return dims
    raise StoreError("no vectors were embedded or cached, so their size is unknown; rerun the command")


def _reused(plan: ShardPlan, parent: ParentShard, fp: str) -> ShardBuild:
    """Same rows, same space: the entry points at the parent's files."""
    pe = parent.entry
    files = {
        name: f.model_copy(update={"version": f.version or parent.version}) if f else None
        for name, f in (("embeddings", pe.embeddings), ("index", pe.index))
    }
    entry = ShardEntry(
        shard=plan.shard,
        rows=plan.rows,
        rejected=plan.rejected,
        fingerprint=fp,
        content_digest=plan.content_digest,
        next_key=pe.next_key,
        rejects=plan.rejects,
        **files,
    )
    return ShardBuild(entry, incremental=False)


def updates_in_place(plan: ShardPlan, parent: ParentShard | None, index_cfg: IndexConfig) -> bool:
    """Whether a changed shard is updated from its parent's graph (a small change) rather than rebuilt."""
    c = plan.counts
    return (
        parent is not None
        and parent.index_rel is not None
        and all(parent.index_cfg.get(k) == getattr(index_cfg, k) for k in ("metric", "dtype", "connectivity"))
        and c.new + c.changed + c.deleted <= INCREMENTAL_MAX_CHANGE * max(parent.entry.rows, 1)
    )


def _new_index(dims: int, cfg: IndexConfig):
    from usearch.index import Index

    return Index(
        ndim=dims,
        metric=cfg.metric,
        dtype=cfg.dtype,
        connectivity=cfg.connectivity,
        expansion_add=cfg.expansion_add,
        expansion_search=cfg.expansion_search,
    )


def _update_in_place(index, store: Store, parent: ParentShard, parent_part, p, same, found, dims: int, tmp):
    """Load the parent's graph, drop changed and deleted keys, add the new vectors under fresh keys.

    Returns (keys, vectors, next_key) of the shard's rows in plan order.
    """
    import pyarrow as pa

    n = p.num_rows
    hashes = p.column("content_hash").to_pylist()
    local_index = str(tmp / "parent.usearch")
    f = parent.entry.index
    store.local_copy(parent.index_rel, local_index, sha256=f and f.sha256, size=f and f.bytes)  # never a torn copy
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
    order_p = np.argsort(p_keys)
    pos = order_p[np.searchsorted(p_keys[order_p], keys[same])]
    vectors = np.zeros((n, dims), dtype=np.float32)
    vectors[same] = to_numpy(parent_part.column("vector"), dims)[pos]
    for i in fresh:
        vectors[i] = found[hashes[i]]
    if len(fresh):
        index.add(keys[fresh], vectors[fresh], threads=THREADS)
    return keys, vectors, next_key + len(fresh)


def _write(store: Store, vdir: str, shard: int, fp: str, p, keys, vectors, index, tmp) -> dict[str, FileEntry]:
    """The embeddings part (in key order) and the index, uploaded; their FileEntries."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dims = vectors.shape[1]
    order = np.argsort(keys, kind="stable")
    part = pa.table(
        {
            "id": p.column("id").take(pa.array(order)),
            "key": pa.array(keys[order], pa.uint64()),
            "content_hash": p.column("content_hash").take(pa.array(order)),
            "vector": to_arrow(vectors[order], dims),
        }
    )

    def put(local: str, rel: str) -> FileEntry:
        sha, size = sha256_file(local)
        store.upload(local, f"{vdir}/{rel}")
        return FileEntry(path=rel, sha256=sha, bytes=size)

    # Vectors barely compress; writing them raw is faster to write and to read back.
    local = str(tmp / "embeddings.parquet")
    pq.write_table(with_fingerprint(part, fp, shard=str(shard)), local, compression="none")
    out = {"embeddings": put(local, layout.embeddings_name(shard))}
    index.save(str(tmp / "index.usearch"))
    out["index"] = put(str(tmp / "index.usearch"), layout.index_name(shard))
    return out


def build_shard(
    store: Store,
    staged: str,
    vdir: str,
    dims: int,
    index_cfg: IndexConfig,
    fp: str,
    plan: ShardPlan,
    parent: ParentShard | None,
    cdir: str,
) -> ShardBuild:
    """Write one shard of the new version (see the module doc)."""
    shard = plan.shard
    if plan.unchanged and parent is not None:
        return _reused(plan, parent, fp)
    p = store.read_table(layout.plan_file(staged, shard))
    hashes = p.column("content_hash").to_pylist()
    same = np.asarray(p.column("status").to_numpy(zero_copy_only=False) == "same", dtype=bool)
    incremental = updates_in_place(plan, parent, index_cfg)
    parent_part = None
    if parent is not None and parent.embeddings_rel:
        parent_part = read_checked(store, parent.embeddings_rel, fp, ["key", "content_hash", "vector"])
        if parent_part is None:
            raise VersionError(f"shard {shard}: the parent's embeddings part cannot be used; run `embray verify`")
    wanted = {h for h, s in zip(hashes, same, strict=True) if not s} if incremental else set(hashes)
    found = lookup_vectors(store, cdir, wanted, dims, fp, [parent_part] if parent_part is not None else [])
    missing = wanted - set(found)
    if missing:
        raise StoreError(
            f"shard {shard}: {len(missing)} vectors are missing from the cache {store.url(cdir)} after embedding; "
            "was it deleted while the build ran? rerun the command"
        )
    tmp = local_tmpdir("embray-shard-")
    index = _new_index(dims, index_cfg)
    if incremental:
        keys, vectors, next_key = _update_in_place(index, store, parent, parent_part, p, same, found, dims, tmp)
    else:
        keys, next_key = np.arange(p.num_rows, dtype=np.uint64), p.num_rows
        vectors = np.array([found[h] for h in hashes], dtype=np.float32).reshape(-1, dims)
        if p.num_rows:
            index.add(keys, vectors, threads=THREADS)
    files: dict[str, Any] = _write(store, vdir, shard, fp, p, keys, vectors, index, tmp)
    tmp.rmdir()
    entry = ShardEntry(
        shard=shard,
        rows=plan.rows,
        rejected=plan.rejected,
        fingerprint=fp,
        content_digest=plan.content_digest,
        next_key=int(next_key),
        rejects=plan.rejects,
        **files,
    )
    return ShardBuild(entry, incremental=incremental)
