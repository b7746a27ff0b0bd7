"""Stage 4, shards: one Ray task per shard writes the embeddings part (id, key, content_hash, vector) and
a USearch index over the same uint64 keys. What a changed shard writes depends on the size of the change
against its parent's shard (:func:`shard_action`):

- none (and the same graph settings): the entry points at the parent's files;
- ``delta``: within ``index.max_delta_fraction`` and ``index.max_segments``: the parent's base and segments
  stay as they are (referenced), and the shard adds a delta segment (the new and changed rows under fresh
  keys, with an index of their own) and a tombstones file (every dead key: the parent's and the changed and
  deleted rows' old keys). Cost follows the change, not the shard;
- ``updated``: a parent without segments and a change <= INCREMENTAL_MAX_CHANGE: its graph is updated in
  place (remove changed and deleted keys, add new vectors under fresh keys) and written whole;
- ``rebuilt``: anything else, including the compaction of a segmented shard past its limits and every shard
  of a parent whose graphs have another ``index.metric``, ``dtype`` or ``connectivity``: built from
  scratch from the parent's live vectors and the cache (nothing is re-embedded that was embedded before).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from embray.config import IndexConfig
from embray.errors import StoreError
from embray.lifecycle.versions import FileEntry, Segment, ShardAction, ShardEntry
from embray.pipeline.types import SPAN_COLUMNS, ParentShard, ShardBuild, ShardPlan
from embray.storage import layout
from embray.storage import metadata as M
from embray.storage.segments import live_rows, read_tombstones, segment_refs, write_tombstones
from embray.storage.store import Store, local_tmpdir, sha256_file
from embray.storage.vectors import read_checked, to_arrow, to_numpy, with_fingerprint

# An in-place shard update stays cheaper and as good as a rebuild while the change is small.
INCREMENTAL_MAX_CHANGE = 0.25
# A shard task reserves one CPU (run.py); USearch would otherwise start a thread per core of the node,
# so eight shard tasks on a 64-core node would run 512 threads. Ray runs as many shard tasks as CPUs are free.
THREADS = 1


def lookup_vectors(
    store: Store,
    cdir: str,
    wanted: set[str],
    dims: int,
    fp: str,
    tables=(),
    first: tuple[str, ...] = (),
    cache: bool = True,
) -> dict[str, np.ndarray]:
    """content_hash -> vector for ``wanted``, from the cache files ``first`` (this build's own chunks), then
    ``tables`` (the parent's live rows), then the rest of the shard's cache (unless not ``cache``); it stops
    reading once every one is found, and lists the cache only if it gets there.

    Every file is checked to carry ``fp``: a build never takes a vector from another space.
    """
    found: dict[str, np.ndarray] = {}
    own = set(first)

    def sources():
        yield from first
        yield from tables
        if cache:
            yield from (f"{cdir}/{n}" for n in store.parquet_names(cdir) if f"{cdir}/{n}" not in own)

    for src in sources():
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
    """Same rows, same space: the entry points at the parent's files (base, segments and tombstones)."""
    pe = parent.entry
    refs = segment_refs(pe, parent.version)
    if not pe.segments and pe.tombstones is None:
        refs.pop("base_rows")  # an unsegmented shard stays one
    tomb = (
        pe.tombstones.model_copy(update={"version": pe.tombstones.version or parent.version}) if pe.tombstones else None
    )
    entry = ShardEntry(
        shard=plan.shard,
        rows=plan.rows,
        rejected=plan.rejected,
        fingerprint=fp,
        content_digest=plan.content_digest,
        next_key=pe.next_key,
        rejects=plan.rejects,
        tombstones=tomb,
        dead=pe.dead,
        **refs,
    )
    return ShardBuild(entry, action=ShardAction.REUSED)


def shard_action(plan: ShardPlan, parent: ParentShard | None, index_cfg: IndexConfig) -> ShardAction:
    """What a build does with one shard: reused, delta, updated or rebuilt (see the module doc)."""
    if plan.compact and parent is not None and (parent.entry.segments or parent.entry.tombstones):
        return ShardAction.REBUILT
    if parent is None or parent.index_rel is None or _graph_settings_changed(parent, index_cfg):
        return ShardAction.REBUILT  # (a graph of other settings is never reused: one version, one metric and dtype)
    if plan.unchanged:
        return ShardAction.REUSED
    c, pe = plan.counts, parent.entry
    base = max(pe.rows if pe.base_rows is None else pe.base_rows, 1)
    limit = index_cfg.max_delta_fraction * base
    segments = len(pe.segments) + (1 if c.new + c.changed else 0)
    seg_rows = sum(g.rows for g in pe.segments) + c.new + c.changed
    dead = pe.dead + c.changed + c.deleted
    if index_cfg.max_segments and segments <= index_cfg.max_segments and seg_rows <= limit and dead <= limit:
        return ShardAction.DELTA
    if pe.segments or pe.tombstones:
        return ShardAction.REBUILT  # compaction: past the delta limits
    few = c.new + c.changed + c.deleted <= INCREMENTAL_MAX_CHANGE * base
    return ShardAction.UPDATED if few else ShardAction.REBUILT


def _graph_settings_changed(parent: ParentShard, index_cfg: IndexConfig) -> bool:
    """Whether the parent's graphs were built with another metric, dtype or connectivity than ``index_cfg``."""
    settings = ("metric", "dtype", "connectivity", "keywords")  # (a keyword index is kept, or not, per version)
    return any(getattr(parent.index_cfg, k) != getattr(index_cfg, k) for k in settings)


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


def _with_parent_texts(p, same: np.ndarray, parent_live):
    """The plan ``p`` with each unchanged row's text taken from the parent's row under its key."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pos = pc.index_in(p.column("parent_key"), value_set=parent_live.column("key"))
    theirs = pc.take(parent_live.column(M.TEXT), pos)
    text = pc.if_else(pa.array(same), theirs, p.column(M.TEXT))
    return p.set_column(p.schema.get_field_index(M.TEXT), M.TEXT, text)


def _write(
    store: Store, vdir: str, shard: int, fp: str, p, keys, vectors, index, tmp, suffix: str = "", keywords=False
):
    """The embeddings part (in key order), the index and, with ``keywords`` (index.keywords: ``p`` holds the
    texts), the part's BM25 index, uploaded; their FileEntries."""
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
            **{c: p.column(c).take(pa.array(order)) for c in SPAN_COLUMNS if c in p.column_names},  # passages
            **{c: p.column(c).take(pa.array(order)) for c in p.column_names if M.kept(c)},  # metadata, texts
        }
    )

    def put(local: str, rel: str) -> FileEntry:
        sha, size = sha256_file(local)
        store.upload(local, f"{vdir}/{rel}")
        return FileEntry(path=rel, sha256=sha, bytes=size)

    # Vectors barely compress; writing them raw is faster to write and to read back.
    local = str(tmp / "embeddings.parquet")
    pq.write_table(with_fingerprint(part, fp, shard=str(shard)), local, compression="none")
    out = {"embeddings": put(local, layout.embeddings_name(shard, suffix))}
    index.save(str(tmp / "index.usearch"))
    out["index"] = put(str(tmp / "index.usearch"), layout.index_name(shard, suffix))
    if keywords:
        from embray.keywords import build_keyword_index

        build_keyword_index(part.column("key").to_numpy(), part.column(M.TEXT).to_pylist(), str(tmp / "kw.bm25"))
        out["keywords"] = put(str(tmp / "kw.bm25"), layout.keywords_name(shard, suffix))
    return out


def _delta(store: Store, vdir: str, plan: ShardPlan, parent: ParentShard, p, same, parent_live, found, dims, fp, cfg):
    """The parent's base and segments by reference, plus a segment of the new and changed rows and the
    tombstones of every dead key."""
    import pyarrow as pa

    shard, pe = plan.shard, parent.entry
    keys = np.zeros(p.num_rows, dtype=np.uint64)
    keys[same] = p.column("parent_key").filter(pa.array(same)).to_numpy()
    fresh = np.flatnonzero(~same)
    keys[fresh] = np.arange(pe.next_key, pe.next_key + len(fresh), dtype=np.uint64)
    live = parent_live.column("key").to_numpy().astype(np.uint64)
    dead = np.union1d(read_tombstones(store, parent.files.tombstones), live[~np.isin(live, keys[same])])
    tmp = local_tmpdir("embray-shard-")
    refs = segment_refs(pe, parent.version)
    segments = list(refs.pop("segments"))
    if len(fresh):
        hashes = p.column("content_hash").take(pa.array(fresh)).to_pylist()
        vectors = np.array([found[h] for h in hashes], dtype=np.float32).reshape(-1, dims)
        index = _new_index(dims, cfg)
        index.add(keys[fresh], vectors, threads=THREADS)
        name = f"-seg{len(segments) + 1:03d}"
        part = p.take(pa.array(fresh))
        files = _write(store, vdir, shard, fp, part, keys[fresh], vectors, index, tmp, name, cfg.keywords)
        segments.append(Segment(rows=len(fresh), **files))
    tomb = None
    if len(dead):
        write_tombstones(dead, str(tmp / "tombstones.parquet"))
        rel = layout.tombstones_name(shard)
        sha, size = sha256_file(str(tmp / "tombstones.parquet"))
        store.upload(str(tmp / "tombstones.parquet"), f"{vdir}/{rel}")
        tomb = FileEntry(path=rel, sha256=sha, bytes=size)
    tmp.rmdir()
    entry = ShardEntry(
        shard=shard,
        rows=plan.rows,
        rejected=plan.rejected,
        fingerprint=fp,
        content_digest=plan.content_digest,
        next_key=int(pe.next_key + len(fresh)),
        rejects=plan.rejects,
        segments=segments,
        tombstones=tomb,
        dead=len(dead),
        **refs,
    )
    return ShardBuild(entry, action=ShardAction.DELTA)


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
    action = shard_action(plan, parent, index_cfg)
    if action == ShardAction.REUSED:
        return _reused(plan, parent, fp)
    import pyarrow.compute as pc

    p = store.read_table(layout.plan_file(staged, shard))
    same_arr = pc.equal(p.column("status"), "same")
    same = np.asarray(same_arr.to_numpy(zero_copy_only=False), dtype=bool)
    parent_live = None
    if parent is not None:  # a delta needs only the parent's keys (its vectors: only for a text it alone holds)
        cols = ["id", "key", "content_hash"] + ([] if action == ShardAction.DELTA else ["vector"])
        texts = action != ShardAction.DELTA and M.TEXT in p.column_names and same.any()
        parent_live = live_rows(store, parent.files, cols + ([M.TEXT] if texts else []), fp=fp)
        if texts:  # source.store_text: an unchanged row's text is its parent's
            p = _with_parent_texts(p, same, parent_live)
    hashes = p.column("content_hash")
    if action != ShardAction.REBUILT:
        hashes = hashes.filter(pc.invert(same_arr))
    wanted = set(hashes.to_pylist())
    chunks = tuple(c.cache for c in plan.chunks)
    tables = [parent_live] if parent_live is not None and action != ShardAction.DELTA else []
    found = lookup_vectors(store, cdir, wanted, dims, fp, tables, first=chunks)
    if action == ShardAction.DELTA and wanted - set(found):
        more = live_rows(store, parent.files, ["key", "content_hash", "vector"], fp=fp)
        found.update(lookup_vectors(store, cdir, wanted - set(found), dims, fp, [more], cache=False))  # (read)
    missing = wanted - set(found)
    if missing:
        raise StoreError(
            f"shard {shard}: {len(missing)} vectors are missing from the cache {store.url(cdir)} after embedding; "
            "was it deleted while the build ran? rerun the command"
        )
    if action == ShardAction.DELTA:
        return _delta(store, vdir, plan, parent, p, same, parent_live, found, dims, fp, index_cfg)
    tmp = local_tmpdir("embray-shard-")
    index = _new_index(dims, index_cfg)
    if action == ShardAction.UPDATED:
        keys, vectors, next_key = _update_in_place(index, store, parent, parent_live, p, same, found, dims, tmp)
    else:
        keys, next_key = np.arange(p.num_rows, dtype=np.uint64), p.num_rows
        vectors = np.array([found[h] for h in hashes.to_pylist()], dtype=np.float32).reshape(-1, dims)
        if p.num_rows:
            index.add(keys, vectors, threads=THREADS)
    files: dict[str, Any] = _write(store, vdir, shard, fp, p, keys, vectors, index, tmp, keywords=index_cfg.keywords)
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
    return ShardBuild(entry, action=action)
