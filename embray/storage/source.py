"""The source corpus: sharded Parquet with an id column and a text column."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from embray.config import SourceConfig
from embray.errors import SourceError, VersionError
from embray.lifecycle.versions import Manifest, SourceFile
from embray.storage.metadata import kinds_of_file, merge_kinds
from embray.storage.store import Store, list_source_infos, sha256_of


@dataclass(frozen=True)
class FileSeen:
    """One source file as listed now; ``sha256`` only where the store gives no ETag (None: not read)."""

    path: str  # relative to source.uri
    bytes: int
    etag: str | None
    sha256: str | None
    mtime_ns: int | None
    checked_ns: int


@dataclass(frozen=True)
class SourceInfo:
    store: Store
    files: list[str]  # filesystem paths, sorted
    id_type: str  # arrow type name of the id column
    digest: str  # sha256 over each file's relative path, size and content digest (S3 ETag or sha256)
    seen: list[FileSeen] = field(default_factory=list)  # per file
    unchanged: list[SourceFile | None] = field(default_factory=list)  # per file: the parent's record, if unchanged
    columns: dict[str, str] = field(default_factory=dict)  # metadata columns (source.columns) -> their kind

    def url(self, path: str) -> str:
        return self.store.fs.unstrip_protocol(path) if self.store.remote else path


def _check_schema(cfg: SourceConfig, store: Store, path: str) -> tuple[str, dict[str, str | None]]:
    """(the id column's type, each metadata column's kind) of one file; SourceError if it cannot serve."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    url = store.fs.unstrip_protocol(path) if store.remote else path
    try:
        schema = pq.read_schema(path, filesystem=store.pyarrow_fs())
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise SourceError(f"{url} is not a readable Parquet file ({e}); repair or remove it") from e
    cols = schema.names
    for key, col in (("id_column", cfg.id_column), ("text_column", cfg.text_column)):
        if col not in cols:
            raise SourceError(
                f"{url} has no column {col!r} (source.{key}); its columns are {cols}: set source.{key} to one of them"
            )
    text_type = schema.field(cfg.text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or pa.types.is_null(text_type)):
        raise SourceError(
            f"{url}: column {cfg.text_column!r} has type {text_type}, not string; "
            "write the text column as a Parquet string (UTF-8) column"
        )
    id_type = schema.field(cfg.id_column).type
    if pa.types.is_large_string(id_type):
        id_type = pa.string()
    if not (pa.types.is_string(id_type) or pa.types.is_integer(id_type)):
        raise SourceError(f"{url}: id column {cfg.id_column!r} has type {id_type}; ids must be strings or integers")
    return str(id_type), kinds_of_file(schema, cfg.columns, url)


# A file's mtime is trusted only once it is this much older than when it was checked: within one mtime
# tick (1-2 s on coarse filesystems, a kernel clock tick elsewhere), a same-size rewrite keeps the mtime.
RACY_NS = 2_000_000_000


def _look(store: Store, path: str, info: dict, prev: SourceFile | None) -> tuple[SourceFile | None, FileSeen]:
    """Size, ETag or mtime of one file, and its sha256 when those cannot say it is unchanged since ``prev``.

    Returns (``prev`` when the file is unchanged, else None; what was seen now).
    """
    checked = time.time_ns()
    rel = path[len(store.root) :]
    size = int(info.get("size") or 0)
    etag = info.get("ETag") or info.get("etag")
    etag = str(etag).strip('"') if etag else None
    mtime = None if store.remote else os.stat(path).st_mtime_ns
    seen = FileSeen(path=rel, bytes=size, etag=etag, sha256=None, mtime_ns=mtime, checked_ns=checked)
    if prev is not None and prev.bytes == size:
        if etag is not None and prev.etag == etag:
            return prev, seen
        trusted = mtime is not None and mtime == prev.mtime_ns and mtime < prev.checked_ns - RACY_NS
        if etag is None and trusted and prev.sha256:
            return prev, dataclasses.replace(seen, sha256=prev.sha256)
    if etag is None:
        with store.fs.open(path, "rb") as fh:
            seen = dataclasses.replace(seen, sha256=sha256_of(fh)[0])
        if prev is not None and prev.etag is None and (prev.bytes, prev.sha256) == (size, seen.sha256):
            return prev, seen
    return None, seen


def inspect_source(
    cfg: SourceConfig,
    previous: Sequence[SourceFile] = (),
    previous_id_type: str = "",
    previous_columns: dict[str, str] | None = None,
) -> SourceInfo:
    """List the corpus files and check the schema of every file that is new or changed since ``previous``
    (what the parent version read, its id type and metadata columns' kinds), before any work starts.
    Unchanged files are neither read nor hashed."""
    store, infos = list_source_infos(cfg.uri, cfg.storage_options)
    files = list(infos)
    before = {p.path: p for p in previous}
    with ThreadPoolExecutor(max_workers=8) as pool:
        looks = list(pool.map(lambda f: _look(store, f, infos[f], before.get(f[len(store.root) :])), files))
        changed = [f for f, (prev, _) in zip(files, looks, strict=True) if prev is None]
        checked = list(pool.map(lambda f: _check_schema(cfg, store, f), changed))
    id_types, columns = [t for t, _ in checked], [k for _, k in checked]
    if len(changed) < len(files):
        id_types.append(previous_id_type)
        columns.append(dict(previous_columns or {}))
    kinds = {("string" if t == "string" else "integer") for t in id_types}
    if len(kinds) > 1:
        raise SourceError(
            f"source {cfg.uri}: the id column {cfg.id_column!r} is a string in some files and an integer in others; "
            "write it with one type in every file"
        )
    id_type = "string" if kinds == {"string"} else "int64"
    seen = [s for _, s in looks]
    digest = hashlib.sha256("".join(f"{s.path}\t{s.bytes}\t{s.etag or s.sha256}\n" for s in seen).encode())
    return SourceInfo(
        store=store,
        files=files,
        id_type=id_type,
        digest=digest.hexdigest(),
        seen=seen,
        unchanged=[prev for prev, _ in looks],
        columns=merge_kinds(columns, cfg.columns, cfg.uri),
    )


def recorded_source(cfg: SourceConfig, version: Manifest) -> SourceInfo:
    """The source exactly as ``version`` read it, from its manifest alone: nothing is listed or read, every
    file counts as unchanged and brings its recorded row states (a compaction rebuilds what the version holds,
    whatever the corpus holds now)."""
    if not version.inputs:
        raise VersionError(
            f"version {version.version} records no source files (it was built before embray recorded them), so "
            "its rows cannot be rebuilt without reading the corpus again: refresh it instead"
        )
    store = Store(version.source.uri, cfg.storage_options)
    seen = [
        FileSeen(path=f.path, bytes=f.bytes, etag=f.etag, sha256=f.sha256, mtime_ns=f.mtime_ns, checked_ns=f.checked_ns)
        for f in version.inputs
    ]
    return SourceInfo(
        store=store,
        files=[store.root + f.path for f in version.inputs],
        id_type=version.source.id_type or "string",
        digest=version.source.digest,
        seen=seen,
        unchanged=list(version.inputs),
        columns=dict(version.source.columns),
    )
