"""Stage 1, scan: one Ray task per new or changed source file reads it in row batches, hashes each row's
text, marks rows that cannot be embedded, assigns each row its shard, and writes the file's row states
(kept with the version: what the next build reuses while the file is unchanged) and per-shard staging
files of the texts it may embed: every good row's, except, for a file the parent read too, rows whose id
held the same text then (already embedded; the plan reads any it still needs from the file itself). Such
an id keeps the shard the parent recorded (the same id and shard count give the same shard)."""

from __future__ import annotations

from embray.errors import SourceError
from embray.lifecycle.versions import FileEntry
from embray.storage import layout
from embray.storage import metadata as M
from embray.storage import rows as R
from embray.storage.source import SourceInfo
from embray.storage.store import Store, local_tmpdir, sha256_file

UPDATED_AT = "updated_at"  # staging column: when the source says a row last changed (UTC), or null
# A chunked version's row states list each document's passages: their spans in its text and content hashes.
PASSAGE_COLUMNS = ["p_start", "p_end", "p_hash"]
BATCH_ROWS = 65536
# A changed file's earlier ids, hashes and shards are held in memory (~100 bytes a row) up to this many rows.
SEEN_MAX_ROWS = 4_000_000


def updated_at(batch, col: str | None):
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


def prepare(
    batch,
    *,
    id_col: str,
    text_col: str,
    shards: int,
    first_row: int,
    updated_col: str | None = None,
    known=None,
    columns: dict[str, str] | None = None,
    url: str = "",
):
    """Hash content, assign shards, and mark rows that cannot be embedded (the rules of :mod:`embray.storage.rows`,
    applied to whole columns). ``known``: each row's shard where the parent's row states of this file already
    hold its id, else null (:func:`_held`); only the other ids are hashed for their shard. ``columns``: the
    metadata columns (name -> kind) to keep, as ``meta.<name>``."""
    import pyarrow as pa

    ids, texts = batch.column(id_col), batch.column(text_col)
    reasons = R.reject_column(ids, texts)
    hashes = R.content_hash_column(texts, reasons.is_null().to_pylist())
    meta = {M.PREFIX + c: M.normalised(batch.column(c), kind, c, url) for c, kind in (columns or {}).items()}
    return pa.table(
        {
            "id": ids,
            "row": pa.array(range(first_row, first_row + len(ids)), pa.int64()),
            "text": texts.cast(pa.string()),
            "content_hash": pa.array(hashes, pa.string()),
            "reason": reasons,
            UPDATED_AT: updated_at(batch, updated_col),
            "shard": _shards(ids, shards, known),
            **meta,
        }
    )


def _shards(ids, shards: int, known):
    """:func:`rows.shard_column`, taking the shards ``known`` gives (same ids, same shard count) as they are."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if known is None or known.null_count == len(known):
        return pa.array(R.shard_column(ids, shards), pa.int32())
    out = pc.fill_null(known, 0).to_numpy(zero_copy_only=False).copy()
    if known.null_count:
        missing = pc.indices_nonzero(pc.is_null(known))
        out[missing.to_numpy()] = R.shard_column(pc.take(ids, missing), shards)
    return pa.array(out, pa.int32())


def _held(ids, before):
    """For each of ``ids``: (its shard, its content hash, its position) in ``before`` (the parent's row states
    of this file: id, content_hash, shard), null where ``before`` has no such id; None without ``before`` or
    when the id types differ."""
    import pyarrow.compute as pc

    if before is None or before.column("id").type != ids.type:
        return None, None, None
    pos = pc.index_in(ids, value_set=before.column("id"), skip_nulls=True)
    return pc.take(before.column("shard"), pos), pc.take(before.column("content_hash"), pos), pos


def with_passages(table, cut, before=None, pos=None):
    """``table`` (prepared rows) with each good row's passages (:data:`PASSAGE_COLUMNS`): cut by ``cut`` (a
    :class:`~embray.pipeline.passages.PassageCutter`), or taken from ``before`` where it holds the row's id
    with the same content hash (``pos``: each row's position there). A row whose text has no token is
    rejected (:data:`rows.NO_TOKENS`): it would have no vector."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    same = [False] * n
    if before is not None and pos is not None and "p_hash" in before.column_names:
        eq = pc.equal(pc.take(before.column("content_hash"), pos), table.column("content_hash"))
        same = pc.fill_null(eq, False).to_pylist()
        where = pos.to_pylist()
    reasons = table.column("reason").to_pylist()
    texts = table.column("text")
    cols: dict[str, list] = {c: [None] * n for c in PASSAGE_COLUMNS}
    for i in range(n):
        if reasons[i] is not None:
            continue
        if same[i]:
            for c in PASSAGE_COLUMNS:
                cols[c][i] = before.column(c)[where[i]].as_py()
            continue
        text = texts[i].as_py()
        ps = cut.cut(text)
        if not ps:
            reasons[i] = R.NO_TOKENS
            continue
        cols["p_start"][i] = [p.start for p in ps]
        cols["p_end"][i] = [p.end for p in ps]
        cols["p_hash"][i] = [R.content_hash(text[p.start : p.end]) for p in ps]
    table = table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    types = {"p_start": pa.list_(pa.int32()), "p_end": pa.list_(pa.int32()), "p_hash": pa.list_(pa.string())}
    for c in PASSAGE_COLUMNS:
        table = table.append_column(c, pa.array(cols[c], types[c]))
    return table


def _state_of(table):
    """A file's rows as its version records them: no text, except a rejected row's (its reason needs it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    reason = table.column("reason")
    if reason.null_count == len(reason):  # no rejected row (the usual case): no copy of the texts
        text = pa.nulls(len(reason), pa.string())
    else:
        text = pc.if_else(pc.is_valid(reason), table.column("text"), None)
    return table.set_column(table.schema.get_field_index("text"), "text", text)


def scan_file(
    src: SourceInfo,
    index: int,
    id_col: str,
    text_col: str,
    shards: int,
    store: Store,
    staged: str,
    states: str,
    updated_col: str | None = None,
    stage_texts: bool = True,
    before: str | None = None,
    chunk=None,
    count=None,
    columns: dict[str, str] | None = None,
) -> tuple[int, FileEntry]:
    """Read one source file in row batches; write its row states (to ``states``, a row group per shard) and,
    with ``stage_texts``, the texts of its good rows to per-shard staging files (what the plan may embed),
    except rows whose id and content hash ``before`` (the row states the parent recorded of this file) holds:
    their texts were embedded then. An id ``before`` holds keeps its recorded shard. With ``chunk`` (a
    version's (ChunkMeta, ModelSpec)), each good row's passages are listed (:func:`with_passages`) and the
    passages' texts are staged instead of the rows'. With ``count`` (the ModelSpec of an unchunked version), each
    good row's tokens past the model's window are counted (column ``dropped``). ``columns``: the metadata
    columns (name -> kind) the row states keep (:func:`prepare`).

    Returns (rows read, the state file, relative to ``states``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = src.files[index]
    url, meta = src.url(path), columns
    how = {"id_col": id_col, "text_col": text_col, "shards": shards, "columns": meta, "url": url}
    tmp = local_tmpdir("embray-scan-")
    writers: dict[int, pq.ParquetWriter] = {}
    parts: dict[int, list] = {}
    rows = 0
    held = _before(store, before, chunked=chunk is not None) if before else None
    cut, counter = _row_tools(chunk, count)
    try:
        try:
            pf = pq.ParquetFile(src.store.pyarrow_fs().open_input_file(path))
            columns = [id_col, text_col]
            if updated_col and updated_col in pf.schema_arrow.names and updated_col not in columns:
                columns.append(updated_col)
            columns += [c for c in (meta or {}) if c not in columns]
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                known, hashes_before, pos = _held(batch.column(id_col), held)
                table = prepare(batch, first_row=rows, updated_col=updated_col, known=known, **how)
                table = _annotated(table, cut, counter, held, pos)
                rows += table.num_rows
                for k, state, good in _by_shard(table, stage_texts, hashes_before):
                    parts.setdefault(k, []).append(state)
                    if good.num_rows == 0:
                        continue
                    if k not in writers:
                        writers[k] = pq.ParquetWriter(str(tmp / f"{k}.parquet"), good.schema, use_dictionary=False)
                    writers[k].write_table(good)
            if rows == 0:  # an empty file still records its (empty) row states
                empty = pf.schema_arrow.empty_table().select(columns)
                table = prepare(empty, first_row=0, **how)
                parts[0] = [_state_of(_annotated(table, cut, counter))]
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            raise SourceError(f"{url} cannot be read as Parquet ({type(e).__name__}: {e}); repair or remove it") from e
        for k, w in writers.items():
            w.close()
            store.upload(str(tmp / f"{k}.parquet"), layout.scan_file(staged, k, index))
        state = _write_state(store, states, parts, tmp)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return rows, state


def _by_shard(table, stage_texts: bool, hashes_before=None):
    """Per shard of a prepared batch (in shard order; rows in file order): (shard, its row states, its texts
    to stage: good rows, none with ``stage_texts`` False, none whose content hash equals ``hashes_before``'s
    (the hash the parent recorded for the row's id in this file))."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    states = _state_of(table)
    states = states.take(pc.sort_indices(states.column("shard")))  # (a stable sort)
    stage = pc.is_null(table.column("reason")) if stage_texts else pa.repeat(False, table.num_rows)
    if hashes_before is not None:
        stage = pc.and_(stage, pc.invert(pc.fill_null(pc.equal(table.column("content_hash"), hashes_before), False)))
    chunked = "p_hash" in table.column_names
    texts = table.select(["shard", "content_hash", "text", *(PASSAGE_COLUMNS if chunked else [])])
    texts = _passage_texts(texts.filter(stage))
    texts = texts.take(pc.sort_indices(texts.column("shard")))
    cut, text_cut = (np.asarray(t.column("shard")).searchsorted for t in (states, texts))
    for k in pc.unique(states.column("shard")).to_pylist():
        a, b = cut(k), cut(k, "right")
        ta, tb = text_cut(k), text_cut(k, "right")
        yield k, states.slice(a, b - a), texts.slice(ta, tb - ta).select(["content_hash", "text"])


def _row_tools(chunk, count):
    """(the passage cutter, the window counter) of a scan task: each only where asked for."""
    from embray.pipeline.passages import cutter, window_counter

    return (cutter(*chunk) if chunk is not None else None), (window_counter(count) if count is not None else None)


def _annotated(table, cut, counter, held=None, pos=None):
    """Prepared rows with their passages (``cut``) or their tokens past the model's window (``counter``)."""
    if cut is not None:
        table = with_passages(table, cut, held, pos)
    if counter is not None:
        table = with_dropped(table, counter)
    return table


def with_dropped(table, counter):
    """``table`` with column ``dropped``: each good row's tokens past the model's window (null: a rejected row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    good = pc.is_null(table.column("reason"))
    texts = table.column("text").filter(good).to_pylist()
    counts = iter(counter.dropped(texts))
    dropped = [next(counts) if ok else None for ok in good.to_pylist()]
    return table.append_column("dropped", pa.array(dropped, pa.int32()))


def _passage_texts(docs):
    """Staged texts of a chunked version: each document's passages (shard, content_hash, text); else ``docs``."""
    import pyarrow as pa

    if "p_hash" not in docs.column_names:
        return docs
    shard, hashes, texts = [], [], []
    cols = [docs.column(c).to_pylist() for c in ("shard", "text", "p_start", "p_end", "p_hash")]
    for k, text, starts, ends, phash in zip(*cols, strict=True):
        for a, b, h in zip(starts, ends, phash, strict=True):
            shard.append(k)
            hashes.append(h)
            texts.append(text[a:b])
    return pa.table(
        {"shard": pa.array(shard, pa.int32()), "content_hash": pa.array(hashes, pa.string()), "text": texts},
        schema=pa.schema([("shard", pa.int32()), ("content_hash", pa.string()), ("text", pa.string())]),
    )


def _before(store: Store, state: str, chunked: bool = False):
    """The id, content hash and shard of each row of a row-state file (one Arrow table of plain arrays); None
    for a file so large that they would outweigh the scan's row batches in memory (then every good row's
    text is staged and every id hashed for its shard)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(store.pyarrow_fs().open_input_file(store.path(state)))
    if pf.metadata.num_rows > SEEN_MAX_ROWS:
        return None
    columns = ["id", "content_hash", "shard"]
    if chunked and "p_hash" in pf.schema_arrow.names:
        columns += PASSAGE_COLUMNS
    t = pf.read(columns=columns)
    return pa.table({c: t.column(c).combine_chunks() for c in t.column_names})


def _write_state(store: Store, states: str, parts: dict[int, list], tmp) -> FileEntry:
    """The file's row states, one row group per shard (in shard order) so a plan task reads only its own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = str(tmp / "state.parquet")
    tables = [pa.concat_tables(parts[k]) for k in sorted(parts)]
    with pq.ParquetWriter(local, tables[0].schema, use_dictionary=["reason", "shard"]) as w:  # (ids, hashes: unique)
        for t in tables:
            w.write_table(t, row_group_size=max(t.num_rows, 1))
    sha, size = sha256_file(local)
    name = layout.source_state_name(sha)  # by content: versions that read the same file share it
    store.upload(local, f"{states}/{name}")
    return FileEntry(path=name, sha256=sha, bytes=size)
