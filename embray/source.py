"""The source corpus: sharded Parquet with an id column and a text column."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from embray.config import SourceConfig
from embray.errors import SourceError
from embray.store import Store, list_source_files, sha256_of


@dataclass(frozen=True)
class SourceInfo:
    store: Store
    files: list[str]  # filesystem paths, sorted
    id_type: str  # arrow type name of the id column
    digest: str  # sha256 over each file's relative path, size and content digest (S3 ETag or sha256)

    def url(self, path: str) -> str:
        return self.store.fs.unstrip_protocol(path) if self.store.remote else path


def _check_schema(cfg: SourceConfig, store: Store, path: str) -> str:
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
    return str(id_type)


def _file_digest(store: Store, path: str) -> str:
    info = store.fs.info(path)
    etag = info.get("ETag") or info.get("etag")
    if etag:
        content = str(etag).strip('"')
    else:
        with store.fs.open(path, "rb") as fh:
            content = sha256_of(fh)[0]
    return f"{path[len(store.root) :]}\t{info.get('size')}\t{content}\n"


def inspect_source(cfg: SourceConfig) -> SourceInfo:
    """List the corpus files and check every file's schema before any work starts."""
    store, files = list_source_files(cfg.uri, cfg.storage_options)
    with ThreadPoolExecutor(max_workers=8) as pool:
        id_types = list(pool.map(lambda f: _check_schema(cfg, store, f), files))
        lines = list(pool.map(lambda f: _file_digest(store, f), files))
    kinds = {("string" if t == "string" else "integer") for t in id_types}
    if len(kinds) > 1:
        raise SourceError(
            f"source {cfg.uri}: the id column {cfg.id_column!r} is a string in some files and an integer in others; "
            "write it with one type in every file"
        )
    id_type = "string" if kinds == {"string"} else "int64"
    digest = hashlib.sha256("".join(lines).encode()).hexdigest()
    return SourceInfo(store=store, files=files, id_type=id_type, digest=digest)
