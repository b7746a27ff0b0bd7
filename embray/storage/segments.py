"""A shard's live rows: its base and delta segments, less its tombstones (see :class:`ShardEntry`).

Keys are never reused within a shard (``next_key`` only grows), so one sorted list of dead keys serves the
base and every segment, and a live key names exactly one row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embray.errors import VersionError
from embray.lifecycle.versions import FileEntry, Manifest, ShardEntry, file_rel
from embray.storage.store import Store
from embray.storage.vectors import read_checked


@dataclass(frozen=True)
class ShardFiles:
    """Store paths of one shard's parts (base first), and of its tombstones; picklable for Ray tasks."""

    parts: tuple[str, ...]  # embeddings parts
    indexes: tuple[str, ...]  # the USearch index of each part
    tombstones: str | None

    @classmethod
    def of(cls, m: Manifest, s: ShardEntry) -> ShardFiles:
        parts = s.parts
        return cls(
            tuple(file_rel(m, e) for e, _, _ in parts),
            tuple(file_rel(m, i) for _, i, _ in parts),
            file_rel(m, s.tombstones) if s.tombstones else None,
        )


def dead_keys(table) -> np.ndarray:
    """The sorted dead keys of a tombstones table (uint64)."""
    return np.sort(table.column("key").to_numpy().astype(np.uint64))


def read_tombstones(store: Store, rel: str | None) -> np.ndarray:
    """The sorted dead keys (uint64; empty without a tombstones file)."""
    if rel is None:
        return np.zeros(0, dtype=np.uint64)
    return dead_keys(store.read_table(rel, ["key"]))


def live_mask(keys: np.ndarray, dead: np.ndarray) -> np.ndarray:
    """True where a key is not tombstoned (``dead`` sorted: a binary search per key, not np.isin's sorts)."""
    keys = np.asarray(keys, dtype=np.uint64)
    if not len(dead):
        return np.ones(len(keys), dtype=bool)
    return dead[np.minimum(np.searchsorted(dead, keys), len(dead) - 1)] != keys


def live_rows(store: Store, files: ShardFiles, columns: list[str], *, fp: str | None = None):
    """The shard's live rows as one Arrow table (``columns`` must include ``key``): base, then segments; None
    for a shard without parts. With ``fp``, every part must carry that fingerprint (VersionError if not)."""
    import pyarrow as pa

    dead = read_tombstones(store, files.tombstones)
    tables = []
    for rel in files.parts:
        if fp is None:
            t = store.read_table(rel, columns)
        else:
            t = read_checked(store, rel, fp, columns)
            if t is None:
                raise VersionError(f"{store.url(rel)} cannot be used (not fingerprint {fp}); run `embray verify`")
        if len(dead):
            t = t.filter(pa.array(live_mask(t.column("key").to_numpy(), dead)))
        tables.append(t)
    if not tables:
        return None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def write_tombstones(keys: np.ndarray, local: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": pa.array(np.sort(keys.astype(np.uint64)), pa.uint64())}), local)


def segment_refs(s: ShardEntry, version: str) -> dict:
    """The fields of a child shard entry that keep pointing at ``version``'s base, segments and tombstones."""

    def ref(f: FileEntry | None) -> FileEntry | None:
        return f.model_copy(update={"version": f.version or version}) if f else None

    return {
        "embeddings": ref(s.embeddings),
        "index": ref(s.index),
        "keywords": ref(s.keywords),
        "base_rows": s.rows if s.base_rows is None else s.base_rows,
        "segments": [
            g.model_copy(update={"embeddings": ref(g.embeddings), "index": ref(g.index), "keywords": ref(g.keywords)})
            for g in s.segments
        ],
    }
