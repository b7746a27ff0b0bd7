"""Stage 1, scan: one Ray task per new or changed source file reads it in row batches, hashes each row's
text, marks rows that cannot be embedded, assigns each row its shard, and writes the file's row states
(kept with the version: what the next build reuses while the file is unchanged) and per-shard staging
files of the texts it may embed."""

from __future__ import annotations

from embray import layout
from embray import rows as R
from embray.errors import SourceError
from embray.source import SourceInfo
from embray.store import Store, local_tmpdir, sha256_file
from embray.versions import FileEntry

UPDATED_AT = "updated_at"  # staging column: when the source says a row last changed (UTC), or null
BATCH_ROWS = 65536


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
    """Hash content, assign shards, and mark rows that cannot be embedded."""
    import pyarrow as pa

    ids = batch.column(id_col).to_pylist()
    texts = batch.column(text_col).to_pylist()
    reasons = [R.reject_reason(i, t) for i, t in zip(ids, texts, strict=True)]
    hashes = [R.content_hash(t) if r is None else None for t, r in zip(texts, reasons, strict=True)]
    return pa.table(
        {
            "id": batch.column(id_col),
            "row": pa.array(range(first_row, first_row + len(ids)), pa.int64()),
            "text": batch.column(text_col).cast(pa.string()),
            "content_hash": pa.array(hashes, pa.string()),
            "reason": pa.array(reasons, pa.string()),
            UPDATED_AT: updated_at(batch, updated_col),
            "shard": pa.array([R.shard_of(i, shards) if i is not None else 0 for i in ids], pa.int32()),
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
) -> tuple[int, FileEntry]:
    """Read one source file in row batches; write its row states (to ``states``, a row group per shard) and,
    with ``stage_texts``, the texts of its good rows to per-shard staging files (what the plan may embed).

    Returns (rows read, the state file, relative to ``states``)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = src.files[index]
    url = src.url(path)
    tmp = local_tmpdir("embray-scan-")
    writers: dict[int, pq.ParquetWriter] = {}
    parts: dict[int, list] = {}
    rows = 0
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
                for k in pc.unique(table.column("shard")).to_pylist():
                    part = table.filter(pc.equal(table.column("shard"), pa.scalar(k, pa.int32())))
                    parts.setdefault(k, []).append(_state_of(part))
                    good = part.filter(pc.is_null(part.column("reason"))).select(["content_hash", "text"])
                    if not stage_texts or good.num_rows == 0:
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
