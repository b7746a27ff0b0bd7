"""Stage 2, plan: one Ray task per shard rejects duplicate ids (every copy), diffs the rows against the
parent's shard by content hash (new, changed, deleted, reused), looks up the vector cache, and writes
the texts still to embed in chunks of similar lengths."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from embray import layout
from embray import rows as R
from embray.build.scan import UPDATED_AT
from embray.build.types import Chunk, ParentShard, ShardPlan
from embray.errors import ConfigError
from embray.results import Counts
from embray.store import Store, local_tmpdir, sha256_file
from embray.vectors import file_fingerprint
from embray.versions import FileEntry, Manifest, file_rel

log = logging.getLogger("embray")


def parent_shards(parent: Manifest | None, fp: str, shards: int) -> list[ParentShard | None]:
    """Per shard, what the build may reuse from ``parent``: nothing unless it is the same vector space."""
    if parent is None or parent.fingerprint != fp:
        return [None] * shards
    if len(parent.shards) != shards:
        raise ConfigError(
            f"index.shards is {shards} but version {parent.version} has {len(parent.shards)} shards; "
            f"set index.shards: {len(parent.shards)}, or build a new version from scratch with `embray backfill`"
        )
    return [
        ParentShard(
            version=parent.version,
            entry=s,
            embeddings_rel=file_rel(parent, s.embeddings) if s.embeddings else None,
            index_rel=file_rel(parent, s.index) if s.index else None,
            index_cfg=dict(parent.index, dims=parent.dims),
        )
        for s in parent.shards
    ]


def cached_hashes(store: Store, cdir: str, fp: str) -> dict[str, str]:
    """content_hash -> cache file name, for every readable cache file of one shard in space ``fp``."""
    import pyarrow.parquet as pq

    out: dict[str, str] = {}
    for name in store.parquet_names(cdir):
        try:
            pf = pq.ParquetFile(store.pyarrow_fs().open_input_file(store.path(f"{cdir}/{name}")))
            if file_fingerprint(pf.schema_arrow) != fp:
                log.error("%s is not from fingerprint %s; ignoring it", store.url(cdir, name), fp)
                continue
            for h in pf.read(columns=["content_hash"]).column("content_hash").to_pylist():
                out[h] = name
        except Exception as e:  # noqa: BLE001 - a damaged cache file is only a cache miss
            log.warning("ignoring unreadable cache file %s: %s", store.url(cdir, name), e)
    return out


def _scanned(store: Store, staged: str, shard: int):
    """Every row the scan stage assigned to ``shard``."""
    import pyarrow as pa

    folder = layout.scan_dir(staged, shard)
    tables = [store.read_table(f"{folder}/{n}") for n in store.parquet_names(folder)]
    if tables:
        return pa.concat_tables(tables, promote_options="permissive")
    return pa.table({c: pa.array([], pa.string()) for c in ("id", "text", "content_hash", "reason", "path")})


def _split_rejects(table) -> tuple[Any, Any, dict[str, int]]:
    """(rows to embed sorted by id, rejected rows with their reason, rejected count by reason)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = table.column("id").to_pylist()
    reasons = table.column("reason").to_pylist()
    dups = R.duplicate_ids(ids)
    for i, row_id in enumerate(ids):
        if reasons[i] is None and row_id in dups:
            reasons[i] = f"{R.DUPLICATE_ID} ({dups[row_id]} rows share it)"
    reason_arr = pa.array(reasons, pa.string())
    bad = table.filter(pc.is_valid(reason_arr)).select(["id", "text", "path"])
    bad = bad.append_column("reason", reason_arr.filter(pc.is_valid(reason_arr)))
    by_reason: dict[str, int] = {}
    for r in bad.column("reason").to_pylist():
        key = R.DUPLICATE_ID if r.startswith(R.DUPLICATE_ID) else r
        by_reason[key] = by_reason.get(key, 0) + 1
    return table.filter(pc.is_null(reason_arr)).sort_by("id"), bad, by_reason


def _write_rejects(store: Store, vdir: str, shard: int, bad) -> FileEntry:
    import pyarrow.parquet as pq

    tmp = local_tmpdir("embray-rejects-")
    local = str(tmp / "rejects.parquet")
    pq.write_table(bad, local)
    sha, size = sha256_file(local)
    rel = layout.rejects_name(shard)
    store.upload(local, f"{vdir}/{rel}")
    tmp.rmdir()
    return FileEntry(path=rel, sha256=sha, bytes=size)


@dataclass
class _Diff:
    status: list[str]  # per good row: same | changed | new
    parent_keys: list[int | None]
    todo: dict[str, int]  # content hash -> first row that needs it embedded
    counts: Counts
    oldest_stale_us: int | None


def _diff(good, parent: ParentShard | None, store: Store, cached: dict[str, str]) -> _Diff:
    """Each row against the parent's shard by content hash; texts in neither the parent nor the cache are todo."""
    old: dict[Any, tuple[str, int]] = {}
    if parent is not None and parent.embeddings_rel:
        p = store.read_table(parent.embeddings_rel, ["id", "key", "content_hash"])
        pairs = zip(p.column("content_hash").to_pylist(), p.column("key").to_pylist(), strict=True)
        old = dict(zip(p.column("id").to_pylist(), pairs, strict=True))
    parent_hashes = {h for h, _ in old.values()}
    ids, hashes = good.column("id").to_pylist(), good.column("content_hash").to_pylist()
    updated = good.column(UPDATED_AT).cast("int64").to_pylist() if UPDATED_AT in good.schema.names else []
    n = dict.fromkeys(("new", "changed", "reused", "cache_hits"), 0)
    d = _Diff([], [], {}, Counts(), None)
    for i, (row_id, h) in enumerate(zip(ids, hashes, strict=True)):
        prev = old.get(row_id)
        d.parent_keys.append(prev[1] if prev is not None else None)
        if prev is not None and prev[0] == h:
            d.status.append("same")
            n["reused"] += 1
            continue
        d.status.append("changed" if prev is not None else "new")
        n[d.status[-1]] += 1
        t = updated[i] if updated else None
        if t is not None and (d.oldest_stale_us is None or t < d.oldest_stale_us):
            d.oldest_stale_us = t
        if h in parent_hashes or h in cached:
            n["cache_hits"] += 1
        elif h not in d.todo:
            d.todo[h] = i
    d.counts = Counts(deleted=len(set(old) - set(ids)), embedded=len(d.todo), **n)
    return d


def _write_plan_and_chunks(store: Store, staged: str, shard: int, cdir: str, good, d: _Diff, chunk_rows: int):
    """The shard's plan file (id, content_hash, status, parent_key) and its chunks of texts to embed."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    plan = pa.table(
        {
            "id": good.column("id"),
            "content_hash": good.column("content_hash"),
            "status": pa.array(d.status, pa.string()),
            "parent_key": pa.array(d.parent_keys, pa.uint64()),
        }
    )
    tmp = local_tmpdir("embray-plan-")
    pq.write_table(plan, str(tmp / "plan.parquet"))
    store.upload(str(tmp / "plan.parquet"), layout.plan_file(staged, shard))
    # Chunks of similar lengths: a model pads each batch to its longest text, so this wastes less compute.
    texts = good.column("text")
    lengths = pc.utf8_length(texts).to_numpy(zero_copy_only=False)
    rows = sorted(d.todo.values(), key=lambda i: (lengths[i], i))
    chunks = []
    for j in range(0, len(rows), chunk_rows):
        take = pa.array(rows[j : j + chunk_rows], pa.int64())
        chunk = pa.table({"content_hash": pc.take(good.column("content_hash"), take), "text": pc.take(texts, take)})
        digest = hashlib.sha256("".join(chunk.column("content_hash").to_pylist()).encode()).hexdigest()[:32]
        pq.write_table(chunk, str(tmp / "need.parquet"))
        rel = layout.need_file(staged, shard, digest)
        store.upload(str(tmp / "need.parquet"), rel)
        chunks.append(Chunk(need=rel, cache=f"{cdir}/{digest}.parquet", rows=chunk.num_rows))
    tmp.rmdir()
    return tuple(chunks)


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
) -> ShardPlan:
    """Decide, for one shard, which rows are rejected, reused, or still to embed (see the module doc).

    A dry run writes nothing: no rejects, no plan, no chunks.
    """
    good, bad, by_reason = _split_rejects(_scanned(store, staged, shard))
    rejects = _write_rejects(store, vdir, shard, bad) if bad.num_rows and not dry_run else None
    d = _diff(good, parent, store, cached_hashes(store, cdir, fp))
    c = d.counts
    chunks = () if dry_run else _write_plan_and_chunks(store, staged, shard, cdir, good, d, chunk_rows)
    return ShardPlan(
        shard=shard,
        rows=good.num_rows,
        rejected=bad.num_rows,
        by_reason=by_reason,
        rejects=rejects,
        counts=c,
        content_digest=R.digest_pairs(good.column("id").to_pylist(), good.column("content_hash").to_pylist()),
        unchanged=parent is not None and c.new == c.changed == c.deleted == 0,
        oldest_stale_us=d.oldest_stale_us,
        chunks=chunks,
    )
