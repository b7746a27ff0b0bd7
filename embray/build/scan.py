"""Stage 1, scan: one Ray task per new or changed source file reads it in row batches, hashes each row's
text, marks rows that cannot be embedded, assigns each row its shard, and writes the file's row states
(kept with the version: what the next build reuses while the file is unchanged) and per-shard staging
files of the texts it may embed: every good row's, except, for a file the parent read too, the texts that
file already held then (already embedded; the plan reads any it still needs from the file itself)."""

from __future__ import annotations

from embray import layout
from embray import rows as R
from embray.errors import SourceError
from embray.source import SourceInfo
from embray.store import Store, local_tmpdir, sha256_file
from embray.versions import FileEntry

UPDATED_AT = "updated_at"  # staging column: when the source says a row last changed (UTC), or null
BATCH_ROWS = 65536
SEEN_MAX_ROWS = 4_000_000  # a changed file's earlier hashes are held (~100 bytes a row) up to this many rows


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


def prepare(batch, *, id_col: str, text_col: str, shards: int, first_row: int, updated_col: str | None = None):
    """Hash content, assign shards, and mark rows that cannot be embedded (the rules of :mod:`embray.rows`,
    applied to whole columns)."""
    import pyarrow as pa

    ids, texts = batch.column(id_col), batch.column(text_col)
    reasons = R.reject_column(ids, texts)
    hashes = R.content_hash_column(texts, reasons.is_null().to_pylist())
    return pa.table(
        {
            "id": ids,
            "row": pa.array(range(first_row, first_row + len(ids)), pa.int64()),
            "text": texts.cast(pa.string()),
            "content_hash": pa.array(hashes, pa.string()),
            "reason": reasons,
            UPDATED_AT: updated_at(batch, updated_col),
            "shard": pa.array(R.shard_column(ids, shards), pa.int32()),
        }
    )


def _state_of(table):
    """A file's rows as its version records them: no text, except a rejected row's (its reason needs it)."""
    import pyarrow.compute as pc

    text = pc.if_else(pc.is_valid(table.column("reason")), table.column("text"), None)
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
) -> tuple[int, FileEntry]:
    """Read one source file in row batches; write its row states (to ``states``, a row group per shard) and,
    with ``stage_texts``, the texts of its good rows to per-shard staging files (what the plan may embed),
    except those whose content hash is in ``before`` (the row states the parent recorded of this file).

    Returns (rows read, the state file, relative to ``states``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = src.files[index]
    url = src.url(path)
    tmp = local_tmpdir("embray-scan-")
    writers: dict[int, pq.ParquetWriter] = {}
    parts: dict[int, list] = {}
    rows = 0
    seen = _hashes_in(store, before) if stage_texts and before else None
    try:
        try:
            pf = pq.ParquetFile(src.store.pyarrow_fs().open_input_file(path))
            columns = [id_col, text_col]
            if updated_col and updated_col in pf.schema_arrow.names and updated_col not in columns:
                columns.append(updated_col)
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                table = prepare(
                    batch, id_col=id_col, text_col=text_col, shards=shards, first_row=rows, updated_col=updated_col
                )
                rows += table.num_rows
                for k, state, good in _by_shard(table, stage_texts, seen):
                    parts.setdefault(k, []).append(state)
                    if good.num_rows == 0:
                        continue
                    if k not in writers:
                        writers[k] = pq.ParquetWriter(str(tmp / f"{k}.parquet"), good.schema)
                    writers[k].write_table(good)
            if rows == 0:  # an empty file still records its (empty) row states
                empty = pf.schema_arrow.empty_table().select(columns)
                parts[0] = [_state_of(prepare(empty, id_col=id_col, text_col=text_col, shards=shards, first_row=0))]
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


def _by_shard(table, stage_texts: bool, seen):
    """Per shard of a prepared batch (in shard order; rows in file order): (shard, its row states, its texts
    to stage: good rows, none with ``stage_texts`` False, none whose content hash is in ``seen``)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    table = table.take(pc.sort_indices(table.column("shard")))  # (a stable sort)
    stage = pc.is_null(table.column("reason")) if stage_texts else pa.repeat(False, table.num_rows)
    if seen is not None:
        stage = pc.and_(stage, pc.invert(pc.is_in(table.column("content_hash"), value_set=seen)))
    texts = table.select(["shard", "content_hash", "text"]).filter(stage)
    states = _state_of(table)
    cut, text_cut = (np.asarray(t.column("shard")).searchsorted for t in (states, texts))
    for k in pc.unique(states.column("shard")).to_pylist():
        a, b = cut(k), cut(k, "right")
        ta, tb = text_cut(k), text_cut(k, "right")
        yield k, states.slice(a, b - a), texts.slice(ta, tb - ta).select(["content_hash", "text"])


def _hashes_in(store: Store, state: str):
    """The distinct content hashes of a row-state file, as an Arrow array; None for a file so large that
    they would outweigh the scan's row batches in memory (then every good row's text is staged)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(store.pyarrow_fs().open_input_file(store.path(state)))
    if pf.metadata.num_rows > SEEN_MAX_ROWS:
        return None
    return pc.unique(pf.read(columns=["content_hash"]).column("content_hash").combine_chunks())


def _write_state(store: Store, states: str, parts: dict[int, list], tmp) -> FileEntry:
    """The file's row states, one row group per shard (in shard order) so a plan task reads only its own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = str(tmp / "state.parquet")
    tables = [pa.concat_tables(parts[k]) for k in sorted(parts)]
    with pq.ParquetWriter(local, tables[0].schema) as w:
        for t in tables:
            w.write_table(t, row_group_size=max(t.num_rows, 1))
    sha, size = sha256_file(local)
    name = layout.source_state_name(sha)  # by content: versions that read the same file share it
    store.upload(local, f"{states}/{name}")
    return FileEntry(path=name, sha256=sha, bytes=size)
