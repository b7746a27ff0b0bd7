"""Stage 2, plan: one Ray task per shard reads its rows' ids and content hashes from every source file's
row states (the scan's, or the parent's for an unchanged file), rejects duplicate ids (every copy), diffs
the rows against the parent's shard by content hash (new, changed, deleted, reused), looks up the vector
cache, and writes the texts still to embed in chunks of similar lengths. Its memory grows with the
shard's ids and hashes; texts are read only for the rows to embed."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from embray.errors import ConfigError, SourceError, StoreError
from embray.lifecycle.versions import ChunkMeta, FileEntry, Manifest, file_rel, same_chunking
from embray.pipeline.scan import PASSAGE_COLUMNS, UPDATED_AT
from embray.pipeline.types import COST_CHARS, SPAN_COLUMNS, Chunk, ParentShard, ShardPlan
from embray.results import Counts
from embray.storage import layout
from embray.storage import metadata as M
from embray.storage import rows as R
from embray.storage.segments import ShardFiles, live_rows
from embray.storage.source import SourceInfo
from embray.storage.store import Store, local_tmpdir, sha256_file
from embray.storage.vectors import file_fingerprint

log = logging.getLogger("embray")


def parent_shards(
    parent: Manifest | None, fp: str, shards: int, chunk: ChunkMeta | None = None
) -> list[ParentShard | None]:
    """Per shard, what the build may reuse from ``parent``: nothing unless it is the same vector space (the
    same model fingerprint and the same chunking)."""
    if parent is None or parent.fingerprint != fp or not same_chunking(parent.chunk, chunk):
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
            files=ShardFiles.of(parent, s),
            index_rel=file_rel(parent, s.index) if s.index else None,
            index_cfg=parent.index,
            rejects_rel=file_rel(parent, s.rejects) if s.rejects else None,
            meta=bool(parent.source.columns) or parent.source.store_text,
        )
        for s in parent.shards
    ]


def cached_hashes(store: Store, cdir: str, fp: str):
    """The content hashes of every readable cache file of one shard in space ``fp``, as one Arrow array."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = []
    for name in store.parquet_names(cdir):
        try:
            pf = pq.ParquetFile(store.pyarrow_fs().open_input_file(store.path(f"{cdir}/{name}")))
            if file_fingerprint(pf.schema_arrow) != fp:
                log.error("%s is not from fingerprint %s; ignoring it", store.url(cdir, name), fp)
                continue
            out.extend(pf.read(columns=["content_hash"]).column("content_hash").chunks)
        except Exception as e:  # noqa: BLE001 - a damaged cache file is only a cache miss
            log.warning("ignoring unreadable cache file %s: %s", store.url(cdir, name), e)
    return pa.concat_arrays(out) if out else pa.array([], pa.string())


STATE_COLUMNS = ["id", "row", "content_hash", "reason", UPDATED_AT, "text"]


def _shard_rows(store: Store, states: list[str], shard: int, chunked: bool = False, columns: dict | None = None):
    """The shard's rows from every source file's row states (its row group of each): ids and content
    hashes, no texts (only a rejected row's), (``chunked``) their passages and the metadata ``columns``
    (name -> kind). Adds ``file``, the file's position in ``states``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tables = []
    for f, rel in enumerate(states):
        pf = pq.ParquetFile(store.pyarrow_fs().open_input_file(store.path(rel)))
        col = pf.schema_arrow.get_field_index("shard")
        groups = []
        for g in range(pf.num_row_groups):
            st = pf.metadata.row_group(g).column(col).statistics
            if st is None or not st.has_min_max or st.min <= shard <= st.max:
                groups.append(g)
        if not groups:
            continue
        optional = [c for c in ("dropped",) if c in pf.schema_arrow.names]  # (row states of older builds lack it)
        meta = [M.PREFIX + c for c in columns or {}]
        columns_read = [*STATE_COLUMNS, *(PASSAGE_COLUMNS if chunked else []), *meta, *optional, "shard"]
        t = pf.read_row_groups(groups, columns=columns_read)
        t = t.filter(pc.equal(t.column("shard"), pa.scalar(shard, pa.int32()))).drop(["shard"])
        tables.append(t.append_column("file", pa.array([f] * t.num_rows, pa.int32())))
    if tables:
        return pa.concat_tables(tables, promote_options="permissive")
    empty = {c: pa.array([], pa.string()) for c in ("id", "content_hash", "reason", "text")}
    if chunked:
        empty.update({c: pa.array([], pa.list_(pa.int32())) for c in ("p_start", "p_end")})
        empty["p_hash"] = pa.array([], pa.list_(pa.string()))
    empty.update({M.PREFIX + c: pa.array([], M.arrow_type(kind)) for c, kind in (columns or {}).items()})
    return pa.table({**empty, "row": pa.array([], pa.int64()), "file": pa.array([], pa.int32())})


def _truncation(docs) -> tuple[int | None, int | None]:
    """(rows longer than the model's window, their tokens past it) among a shard's good rows; (None, None)
    where the scan counted none (a chunked version, a model without a window, row states of older builds)."""
    import pyarrow.compute as pc

    if "dropped" not in docs.column_names or docs.column("dropped").null_count == docs.num_rows:
        return None, None
    col = docs.column("dropped")
    return pc.sum(pc.greater(col, 0)).as_py() or 0, pc.sum(col).as_py() or 0


def passage_rows(docs):
    """A chunked shard's good documents as one row per passage: ``id`` (``<doc>#<ordinal>#<start>``: a
    passage keeps its row only while its document id, ordinal, span and text stay the same), its
    ``content_hash`` (of its text: the vector cache's key, so a passage that moved is not embedded again),
    ``doc`` (the document's id), ``ordinal``, ``start``, ``end`` (its span in the document), and the
    document's ``file``, ``row``, change time and metadata columns."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    hashes = docs.column("p_hash").combine_chunks()
    lens = pc.list_value_length(hashes).to_numpy(zero_copy_only=False).astype(np.int64)
    parent = pa.array(np.repeat(np.arange(len(lens)), lens))
    ordinal = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    doc = pc.take(docs.column("id"), parent)
    start = pc.list_flatten(docs.column("p_start").combine_chunks())
    as_text = [pc.cast(a, pa.string()) for a in (doc, pa.array(ordinal), start)]
    out = {
        "id": pc.binary_join_element_wise(*as_text, "#"),
        "content_hash": pc.list_flatten(hashes),
        "doc": doc,
        "ordinal": pa.array(ordinal, pa.int32()),
        "start": start,
        "end": pc.list_flatten(docs.column("p_end").combine_chunks()),
    }
    for c in docs.column_names:  # and the document's metadata, which each of its passages carries
        if c in ("file", "row", UPDATED_AT) or c.startswith(M.PREFIX):
            out[c] = pc.take(docs.column(c), parent)
    return pa.table(out).sort_by("id")  # (the order a shard's content digest is taken in, as for rows)


def _split_rejects(table) -> tuple[Any, Any, dict[str, int]]:
    """(rows to embed sorted by id, rejected rows with their reason, rejected count by reason)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    reason_arr = table.column("reason").combine_chunks()
    counts = pc.value_counts(table.column("id"))
    multi = counts.filter(pc.greater(counts.field("counts"), 1))
    pairs = zip(multi.field("values").to_pylist(), multi.field("counts").to_pylist(), strict=True)
    dups = {i: n for i, n in pairs if i is not None}
    if dups:  # every copy of a duplicate id is rejected, naming how many rows share it
        reasons = [
            f"{R.DUPLICATE_ID} ({dups[i]} rows share it)" if r is None and i in dups else r
            for i, r in zip(table.column("id").to_pylist(), reason_arr.to_pylist(), strict=True)
        ]
        reason_arr = pa.array(reasons, pa.string())
    bad = table.filter(pc.is_valid(reason_arr)).set_column(
        table.schema.get_field_index("reason"), "reason", reason_arr.filter(pc.is_valid(reason_arr))
    )
    by_reason: dict[str, int] = {}
    for r in bad.column("reason").to_pylist():
        key = R.DUPLICATE_ID if r.startswith(R.DUPLICATE_ID) else r
        by_reason[key] = by_reason.get(key, 0) + 1
    return table.filter(pc.is_null(reason_arr)).sort_by("id"), bad, by_reason


def _texts(store: Store, staged: str, shard: int, wanted: set[str], rows, src: SourceInfo, text_col: str):
    """content_hash -> text for ``wanted``: from the texts the scan staged for this shard, then from the
    source files (the rest: texts a file already held when the parent read it, e.g. of a duplicate id, and
    rows of files this build did not read)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out: dict[str, str] = {}
    folder = layout.scan_dir(staged, shard)
    for name in store.parquet_names(folder):
        if len(out) == len(wanted):
            break
        t = store.read_table(f"{folder}/{name}")
        t = t.filter(pc.is_in(t.column("content_hash"), value_set=pa.array(list(wanted - out.keys()), pa.string())))
        out.update(zip(t.column("content_hash").to_pylist(), t.column("text").to_pylist(), strict=True))
    missing = wanted - out.keys()
    if not missing:
        return out
    hit = rows.filter(pc.is_in(rows.column("content_hash"), value_set=pa.array(list(missing), pa.string())))
    spans = ["start", "end"] if "start" in hit.column_names else []  # passages: slices of their documents
    by_file: dict[int, dict[int, list]] = {}
    for f, row, h, *span in zip(
        *(hit.column(c).to_pylist() for c in ("file", "row", "content_hash", *spans)), strict=True
    ):
        by_file.setdefault(f, {}).setdefault(row, []).append((h, span))
    for f, want in by_file.items():
        path = src.files[f]
        col = pq.ParquetFile(src.store.pyarrow_fs().open_input_file(path)).read(columns=[text_col]).column(0)
        for row, pieces in want.items():
            text = col[row].as_py() if row < len(col) else None
            for h, span in pieces:
                piece = text[span[0] : span[1]] if span and isinstance(text, str) else text
                if piece is None or R.content_hash(piece) != h:
                    raise SourceError(f"{src.url(path)} changed while this build read it; run the command again")
                out[h] = piece
    return out


def _write_rejects(store: Store, vdir: str, shard: int, bad, texts: dict[str, str], urls: list[str]) -> FileEntry:
    """id, text, path, reason of every rejected row (a duplicate's text comes from ``texts``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = [
        t if t is not None else texts.get(h)
        for t, h in zip(bad.column("text").to_pylist(), bad.column("content_hash").to_pylist(), strict=True)
    ]
    table = pa.table(
        {
            "id": bad.column("id"),
            "text": pa.array(text, pa.string()),
            "path": pa.array([urls[f] for f in bad.column("file").to_pylist()], pa.string()),
            "reason": bad.column("reason"),
        }
    )
    tmp = local_tmpdir("embray-rejects-")
    local = str(tmp / "rejects.parquet")
    pq.write_table(table, local)
    sha, size = sha256_file(local)
    rel = layout.rejects_name(shard)
    store.upload(local, f"{vdir}/{rel}")
    tmp.rmdir()
    return FileEntry(path=rel, sha256=sha, bytes=size)


def _copy_rejects(store: Store, parent: ParentShard, vdir: str) -> FileEntry:
    """The parent's rejects file, copied (checked) into this version: the rejected rows of the same rows,
    without reading the source again; the copy lets gc drop the parent later."""
    pr = parent.entry.rejects
    data = store.read_bytes(parent.rejects_rel)
    if hashlib.sha256(data).hexdigest() != pr.sha256:
        raise StoreError(f"{store.url(parent.rejects_rel)} does not match its checksum in version {parent.version}")
    store.write_bytes(f"{vdir}/{pr.path}", data)
    return FileEntry(path=pr.path, sha256=pr.sha256, bytes=len(data))


@dataclass
class _Diff:
    status: Any  # Arrow strings, per good row: same | changed | new
    parent_keys: Any  # Arrow uint64, per good row: its key in the parent's shard (null: a new id)
    todo: dict[str, int]  # content hash -> first row that needs it embedded
    counts: Counts
    oldest_stale_us: int | None


def _diff(good, parent: ParentShard | None, store: Store, cdir: str, fp: str) -> _Diff:
    """Each row against the parent's shard by id and content hash (Arrow hash lookups, no loop over the
    shard); texts of changed or new rows in neither the parent nor the vector cache are todo."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids, hashes = good.column("id").combine_chunks(), good.column("content_hash").combine_chunks()
    with_meta = parent is not None and parent.meta and M.META_HASH in good.column_names
    cols = ["id", "key", "content_hash", *([M.META_HASH] if with_meta else [])]
    p = live_rows(store, parent.files, cols) if parent is not None else None
    if p is None:
        p = pa.table(
            {"id": pa.array([], ids.type), "key": pa.array([], pa.uint64()), "content_hash": pa.array([], pa.string())}
        )
    # Plain arrays from here: (pyarrow 25 crashes in indices_nonzero on a chunked array of no chunks)
    p_ids, p_keys, p_hashes = (p.column(c).combine_chunks() for c in ("id", "key", "content_hash"))
    if p_ids.type != ids.type:  # the corpus's id type changed (integers <-> strings): compare as written
        p_ids, ids = pc.cast(p_ids, pa.string()), pc.cast(ids, pa.string())
    pos = pc.index_in(ids, value_set=p_ids)
    known = pc.is_valid(pos)
    same = pc.fill_null(pc.equal(pc.take(p_hashes, pos), hashes), False)
    if with_meta:  # a row whose metadata changed is a changed row (its vector: the parent's, by content hash)
        meta = pc.equal(pc.take(p.column(M.META_HASH).combine_chunks(), pos), good.column(M.META_HASH))
        same = pc.and_(same, pc.fill_null(meta, False))
    elif parent is not None and (parent.meta or M.META_HASH in good.column_names):  # kept by one of the two only
        same = pa.repeat(False, len(ids))
    status = pc.if_else(same, "same", pc.if_else(known, "changed", "new"))
    moved = pc.indices_nonzero(pc.invert(same))  # the changed and new rows: few in a refresh
    moved_hashes = pc.take(hashes, moved)
    hit = _among(moved_hashes, p_hashes)
    if not pc.all(hit).as_py():  # (all of none is true: the cache is read only when something may be in it)
        hit = pc.or_(hit, _among(moved_hashes, cached_hashes(store, cdir, fp)))
    todo: dict[str, int] = {}
    for row, h, h_hit in zip(moved.to_pylist(), moved_hashes.to_pylist(), hit.to_pylist(), strict=True):
        if not h_hit and h not in todo:
            todo[h] = row
    oldest = None
    if UPDATED_AT in good.schema.names and len(moved):
        oldest = pc.min(pc.take(good.column(UPDATED_AT), moved).cast(pa.int64())).as_py()
    n_same, n_known = pc.sum(same).as_py() or 0, pc.sum(known).as_py() or 0
    counts = Counts(
        reused=n_same,
        changed=n_known - n_same,
        new=len(ids) - n_known,
        deleted=len(p_ids) - pc.count_distinct(pos).as_py(),  # (a version's ids are unique)
        embedded=len(todo),
        cache_hits=pc.sum(hit).as_py() or 0,
    )
    return _Diff(status, pc.take(p_keys, pos), todo, counts, oldest)


def _among(few, many):
    """``pc.is_in(few, value_set=many)``, for few values among many: the hash set is built of ``few`` and
    ``many`` only probed (10x faster at 1,000 among 150,000 content hashes)."""
    import pyarrow.compute as pc

    found = pc.filter(many, pc.is_in(many, value_set=few))
    return pc.is_in(few, value_set=pc.unique(found))


def _write_plan_and_chunks(
    store: Store,
    staged: str,
    shard: int,
    cdir: str,
    good,
    d: _Diff,
    texts: dict[str, str],
    chunk_rows: int,
    stored: list[str | None] | None = None,
):
    """The shard's plan file (id, content_hash, status, parent_key, a chunked version's spans, the metadata
    columns and ``stored`` texts) and its chunks of texts to embed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    plan = pa.table(
        {
            "id": good.column("id"),
            "content_hash": good.column("content_hash"),
            "status": d.status,
            "parent_key": d.parent_keys.cast(pa.uint64()),
            **{c: good.column(c) for c in SPAN_COLUMNS if c in good.column_names},  # a chunked version's passages
            **{c: good.column(c) for c in good.column_names if c.startswith(M.PREFIX) or c == M.META_HASH},
        }
    )
    if stored is not None:  # source.store_text: the texts of new and changed rows (the rest: the parent's)
        moved = [t if s != "same" else None for t, s in zip(stored, d.status.to_pylist(), strict=True)]
        plan = plan.append_column(M.TEXT, pa.array(moved, pa.string()))
    tmp = local_tmpdir("embray-plan-")
    pq.write_table(plan, str(tmp / "plan.parquet"), use_dictionary=["status"])  # (ids, hashes: unique)
    store.upload(str(tmp / "plan.parquet"), layout.plan_file(staged, shard))
    # Chunks of similar lengths: a model pads each batch to its longest text, so this wastes less compute.
    todo = sorted(d.todo.items(), key=lambda hi: (len(texts[hi[0]]), hi[1]))
    chunks = []
    for j in range(0, len(todo), chunk_rows):
        hashes = [h for h, _ in todo[j : j + chunk_rows]]
        chunk = pa.table({"content_hash": pa.array(hashes, pa.string()), "text": [texts[h] for h in hashes]})
        digest = hashlib.sha256("".join(hashes).encode()).hexdigest()[:32]
        pq.write_table(chunk, str(tmp / "need.parquet"))
        rel = layout.need_file(staged, shard, digest)
        store.upload(str(tmp / "need.parquet"), rel)
        chars = sum(min(len(texts[h]), COST_CHARS) for h in hashes)
        chunks.append(Chunk(need=rel, cache=f"{cdir}/{digest}.parquet", rows=chunk.num_rows, chars=chars))
    tmp.rmdir()
    return tuple(chunks)


@dataclass(frozen=True)
class ShardInputs:
    """Where one shard's rows come from: every source file's row states, and the staged texts of this build."""

    states: list[str]  # store-relative row-state file of each source file, in source order
    urls: list[str]  # each source file's URL (for the rejects' path column)
    staged: str
    src: SourceInfo
    text_column: str
    compact: bool = False  # a compaction: the parent's rows exactly; its rejects files copied, not rebuilt
    chunked: bool = False  # rows are passages of documents (the row states list them)
    columns: dict[str, str] = field(default_factory=dict)  # metadata columns kept (name -> kind)
    store_text: bool = False  # each row's text is kept in the embeddings parts

    @property
    def meta(self) -> bool:
        """Whether the version keeps metadata (columns or texts): its rows carry ``meta_hash``."""
        return bool(self.columns) or self.store_text


def plan_shard(
    store: Store,
    inputs: ShardInputs,
    vdir: str,
    shard: int,
    parent: ParentShard | None,
    cdir: str,
    fp: str,
    chunk_rows: int,
    dry_run: bool,
) -> ShardPlan:
    """Decide, for one shard, which rows are rejected, reused, or still to embed (see the module doc).

    Reads ids and content hashes; texts only of the rows to embed and of rejected duplicates. A dry run
    writes nothing: no rejects, no plan, no chunks.
    """
    import pyarrow.compute as pc

    rows = _shard_rows(store, inputs.states, shard, inputs.chunked, inputs.columns)
    docs, bad, by_reason = _split_rejects(rows)
    good = passage_rows(docs) if inputs.chunked else docs
    if inputs.meta:
        good = good.append_column(M.META_HASH, M.meta_hash_column(good, list(inputs.columns), inputs.store_text))
    d = _diff(good, parent, store, cdir, fp)
    c = d.counts
    rejects, chunks = None, ()
    if inputs.compact and parent is not None and parent.rejects_rel and not dry_run:
        rejects = _copy_rejects(store, parent, vdir)
    if not dry_run:
        dup_hashes = bad.filter(pc.is_null(bad.column("text"))).column("content_hash").drop_null().to_pylist()
        dups = set() if inputs.compact else set(dup_hashes)

        def texts_of(wanted: set[str], where) -> dict[str, str]:
            return _texts(store, inputs.staged, shard, wanted, where, inputs.src, inputs.text_column) if wanted else {}

        # source.store_text: every new or changed row's text is kept (the rest are in the parent's parts)
        moved = pc.filter(good.column("content_hash"), pc.not_equal(d.status, "same")) if inputs.store_text else None
        wanted = set(d.todo) | (set(moved.to_pylist()) if moved is not None else set())
        if inputs.chunked:  # passages' texts are staged, a duplicate document's is read from its file
            texts, dup_texts = texts_of(wanted, good), texts_of(dups, rows)
        else:
            texts = dup_texts = texts_of(wanted | dups, rows)
        if bad.num_rows and not inputs.compact:
            rejects = _write_rejects(store, vdir, shard, bad, dup_texts, inputs.urls)
        stored = [texts.get(h) for h in good.column("content_hash").to_pylist()] if inputs.store_text else None
        chunks = _write_plan_and_chunks(store, inputs.staged, shard, cdir, good, d, texts, chunk_rows, stored)
    truncated, dropped = _truncation(docs)
    return ShardPlan(
        shard=shard,
        documents=docs.num_rows,
        truncated=truncated,
        truncated_tokens=dropped,
        rows=good.num_rows,
        rejected=bad.num_rows,
        by_reason=by_reason,
        rejects=rejects,
        counts=c,
        content_digest=R.digest_column(good.column("id"), good.column("content_hash")),
        unchanged=parent is not None and c.new == c.changed == c.deleted == 0,
        oldest_stale_us=d.oldest_stale_us,
        chunks=chunks,
        compact=inputs.compact,
    )
