"""Vectors in Parquet: a FixedSizeList<float32> column <-> a (rows, dims) float32 array, and fingerprinted reads."""

from __future__ import annotations

import logging

import numpy as np

from embray.storage.layout import FINGERPRINT_KEY
from embray.storage.store import Store

log = logging.getLogger("embray")


def to_numpy(column, dims: int) -> np.ndarray:
    """A vector column (chunked or not, list or extension type) as a (rows, dims) float32 array."""
    import pyarrow as pa

    col = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if isinstance(col.type, pa.ExtensionType):
        col = col.storage
    if len(col) == 0:
        return np.zeros((0, dims), dtype=np.float32)
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dims)


def to_arrow(vectors: np.ndarray, dims: int):
    """A (rows, dims) array as a FixedSizeList<float32> array."""
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(vectors).ravel(), pa.float32()), dims)


def file_fingerprint(schema) -> str:
    """The fingerprint a vectors file carries in its Parquet metadata ('' when none)."""
    return (schema.metadata or {}).get(FINGERPRINT_KEY, b"").decode()


def with_fingerprint(table, fp: str, **extra: str):
    """``table`` with the fingerprint (and ``extra`` embray.* keys) in its schema metadata."""
    meta = {FINGERPRINT_KEY: fp.encode(), **{f"embray.{k}".encode(): v.encode() for k, v in extra.items()}}
    return table.replace_schema_metadata(meta)


def read_checked(store: Store, rel: str, fp: str, columns: list[str]):
    """Read a vectors file only if it carries fingerprint ``fp``; None (logged) when it does not or is damaged."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(store.pyarrow_fs().open_input_file(store.path(rel)))
        got = file_fingerprint(pf.schema_arrow)
        if got != fp:
            log.error("%s holds fingerprint %r, not %s; not using it", store.url(rel), got, fp)
            return None
        return pf.read(columns=columns)
    except Exception as e:  # noqa: BLE001 - a damaged cache file is only a cache miss
        log.warning("ignoring unreadable %s: %s", store.url(rel), e)
        return None
