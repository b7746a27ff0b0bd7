"""Search a committed version: memory-mapped USearch shards, fan-out, top-k merge.

Queries are embedded with the version's own model, and only after its
fingerprint is recomputed on this machine and matches the manifest's; a vector
query must name the fingerprint it was made with. Nothing ever compares
vectors from two spaces.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embray import rows as R
from embray.config import Config
from embray.errors import VersionError
from embray.models import Embedder, fingerprint, load_embedder
from embray.store import Store
from embray.versions import Manifest, file_rel, read_manifest


@dataclass(frozen=True)
class Hit:
    id: Any
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": round(self.score, 6)}


def _score(metric: str, distance: float) -> float:
    return -distance if metric == "l2sq" else 1.0 - distance


def _cache_root() -> Path:
    return Path(os.environ.get("EMBRAY_CACHE", Path.home() / ".cache" / "embray"))


def check_consistent(manifest: Manifest) -> None:
    """Refuse a version whose parts do not all belong to the manifest's one vector space."""
    foreign = sorted({s.fingerprint for s in manifest.shards} - {manifest.fingerprint})
    if foreign:
        raise VersionError(
            f"version {manifest.version} mixes fingerprints: manifest {manifest.fingerprint}, shards {foreign}; "
            "it cannot be searched; rebuild it with `embray backfill`"
        )


class VersionIndex:
    """One committed version opened for search. Shards are memory-mapped read-only."""

    def __init__(self, store: Store, manifest: Manifest):
        from usearch.index import Index

        check_consistent(manifest)
        self.store = store
        self.manifest = manifest
        self.metric = manifest.index.get("metric", "cos")
        self._embedder: Embedder | None = None
        self.shards: list[tuple[Index, np.ndarray, np.ndarray]] = []  # index, keys (sorted), ids
        for s in manifest.shards:
            if s.rows == 0 or s.index is None or s.embeddings is None:
                continue
            index_path = self._local(file_rel(manifest, s.index), s.index.sha256)
            ids_path = self._local(file_rel(manifest, s.embeddings), s.embeddings.sha256)
            index = Index.restore(str(index_path), view=True)
            if index is None or len(index) != s.rows or index.ndim != manifest.dims:
                raise VersionError(
                    f"shard {s.shard} of {manifest.version} does not match its manifest "
                    f"({0 if index is None else len(index)} vectors of {getattr(index, 'ndim', '?')} dims, "
                    f"expected {s.rows} of {manifest.dims}); run `embray verify`"
                )
            index.expansion_search = int(manifest.index.get("expansion_search", 64))
            self.shards.append((index, *_read_keys(ids_path)))

    def _local(self, rel: str, sha256: str) -> Path:
        """A local path for a version file: itself on local disk, a verified cached copy from S3."""
        if not self.store.remote:
            return Path(self.store.path(rel))
        dest = _cache_root() / rel
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(dest.suffix + ".part")
            self.store.download(rel, tmp)
            h = hashlib.sha256(tmp.read_bytes()).hexdigest()
            if h != sha256:
                tmp.unlink()
                raise VersionError(f"{self.store.url(rel)} has sha256 {h}, the manifest says {sha256}")
            tmp.rename(dest)
        return dest

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def embedder(self) -> Embedder:
        """The version's own model, loaded on first use and checked against the version's fingerprint."""
        if self._embedder is None:
            here = fingerprint(self.manifest.model)
            if here != self.manifest.fingerprint:
                raise VersionError(
                    f"version {self.version} was built by {self.manifest.model.label} with fingerprint "
                    f"{self.manifest.fingerprint}, but that model here has fingerprint {here}: its weights or spec "
                    "differ; install the same model files to query this version"
                )
            self._embedder = load_embedder(self.manifest.model)
        return self._embedder

    def search_text(self, texts: list[str], k: int = 10) -> list[list[Hit]]:
        return self.search_vectors(self.embedder.embed_queries(texts), k)

    def search_vectors(self, vectors: np.ndarray, k: int = 10, *, exact: bool = False) -> list[list[Hit]]:
        """Top-k over every shard for each query row. ``exact`` brute-forces each shard."""
        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if q.shape[1] != self.manifest.dims:
            raise VersionError(f"query vectors have {q.shape[1]} dims; version {self.version} has {self.manifest.dims}")
        per_query: list[list[list[tuple[float, Any]]]] = [[] for _ in range(len(q))]
        for index, keys_sorted, ids in self.shards:
            m = index.search(q, min(k, len(ids)), exact=exact)
            keys_2d, dists_2d = np.atleast_2d(m.keys), np.atleast_2d(m.distances)
            counts = np.atleast_1d(getattr(m, "counts", None) if hasattr(m, "counts") else len(m))
            for qi in range(len(q)):
                n = int(counts[qi])
                keys, dists = keys_2d[qi][:n], dists_2d[qi][:n]
                rows = np.searchsorted(keys_sorted, keys)
                per_query[qi].append([(float(d), ids[r]) for r, d in zip(rows, dists, strict=True)])
        return [[Hit(_plain(i), _score(self.metric, d)) for d, i in R.merge_topk(shards, k)] for shards in per_query]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _read_keys(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, ids) of an embeddings part, which is stored in key order."""
    import pyarrow.parquet as pq

    t = pq.read_table(str(path), columns=["key", "id"])
    return t.column("key").to_numpy(), t.column("id").to_numpy(zero_copy_only=False)


def resolve_version(cfg: Config, version: str | None, alias: str = "active") -> str:
    """``version`` itself, or the version the alias points at."""
    if version:
        return version
    from embray.registry import Registry

    target = Registry(cfg).aliases().get(alias)
    if not target:
        raise VersionError(
            f"collection {cfg.collection!r} has no {alias!r} version yet; run `embray backfill --config ...` "
            "(the first version becomes active) or name one with --version"
        )
    return target


def open_version(cfg: Config, version: str | None = None) -> VersionIndex:
    """Open ``version`` of the configured collection (default: the active one) for search."""
    store = Store(cfg.store.uri, cfg.store.storage_options)
    vid = resolve_version(cfg, version)
    return VersionIndex(store, read_manifest(store, cfg.collection, vid))
