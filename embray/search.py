"""Search a committed version: memory-mapped USearch shards, fan-out, top-k merge.

Queries are embedded with the version's own model, and only after its
fingerprint is recomputed on this machine and matches the manifest's; a vector
query must name the fingerprint it was made with. Nothing ever compares
vectors from two spaces.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

import numpy as np

from embray import rows as R
from embray.errors import VersionError
from embray.layout import local_cache_root
from embray.models import Embedder, fingerprint, load_embedder
from embray.results import Hit, SearchResult
from embray.segments import dead_keys, live_mask
from embray.store import Store
from embray.vectors import to_numpy
from embray.versions import FileEntry, Manifest, file_rel


def _score(metric: str, distance: float) -> float:
    return -distance if metric == "l2sq" else 1.0 - distance


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

    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        *,
        shared: VersionIndex | None = None,
        group: tuple[int, int] | None = None,
        encoder_only: bool = False,
    ):
        """``shared``: an open version whose loaded encoder this one may use when their fingerprints are equal
        (a refresh and its parent), instead of loading a second copy of the model. ``group`` = (g, G): open
        only shard group g of G (the shards :func:`group_shards` names), for a replica that serves one part
        of a version too large for one; :func:`merge_hits` combines the groups' answers. ``encoder_only``: open
        no shard (a sharded Serve ingress, which only embeds queries)."""
        import pyarrow.parquet as pq
        from usearch.index import Index

        check_consistent(manifest)
        self.store = store
        self.manifest = manifest
        self.metric = manifest.index.get("metric", "cos")
        same_space = shared is not None and shared.fingerprint == manifest.fingerprint
        self._embedder: Embedder | None = shared.loaded_embedder if same_space else None
        # One entry per HNSW part (a shard's base, and the delta segments of a shard with many segment rows):
        # index, keys (sorted), ids (numpy or Arrow), and the shard's dead keys (sorted; empty without any).
        self.shards: list[tuple[Index, np.ndarray, Any, np.ndarray]] = []
        # Per shard with delta segments (up to FLAT_MAX_ROWS live rows in them): their live rows in memory,
        # searched exactly: (vectors float32, unit length for cos; squared norms for l2sq; keys; ids). One
        # matrix product instead of a search per segment.
        self.flat: list[tuple[np.ndarray, np.ndarray, np.ndarray, Any]] = []
        mine = set(group_shards(len(manifest.shards), *group)) if group else None
        for s in manifest.shards:
            if encoder_only or s.rows == 0 or not s.parts:
                continue
            if mine is not None and s.shard not in mine:
                continue
            dead = np.zeros(0, dtype=np.uint64)
            if s.tombstones is not None:
                dead = dead_keys(pq.read_table(str(self._local(file_rel(manifest, s.tombstones), s.tombstones))))
            parts = s.parts
            if s.segments and sum(g.rows for g in s.segments) <= FLAT_MAX_ROWS:
                self.flat.append(self._flat(s.segments, dead))
                parts = parts[:1]
            for emb, idx, rows in parts:
                index = Index.restore(str(self._local(file_rel(manifest, idx), idx)), view=True)
                if index is None or len(index) != rows or index.ndim != manifest.dims:
                    raise VersionError(
                        f"shard {s.shard} of {manifest.version} does not match its manifest "
                        f"({0 if index is None else len(index)} vectors of {getattr(index, 'ndim', '?')} dims in "
                        f"{idx.path}, expected {rows} of {manifest.dims}); run `embray verify`"
                    )
                index.expansion_search = int(manifest.index.get("expansion_search", 64))
                self.shards.append((index, *_read_keys(self._local(file_rel(manifest, emb), emb)), dead))

    def _flat(self, segments, dead: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
        """The live rows of a shard's delta segments, in memory: (vectors, squared norms, keys, ids)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for g in segments:
            t = pq.read_table(
                str(self._local(file_rel(self.manifest, g.embeddings), g.embeddings)), columns=["key", "id", "vector"]
            )
            tables.append(t.filter(pa.array(live_mask(t.column("key").to_numpy(), dead))) if len(dead) else t)
        t = pa.concat_tables(tables)
        col = t.column("id")
        ids = (
            col.combine_chunks().to_numpy()
            if pa.types.is_integer(col.type)
            else col.cast(pa.large_string()).combine_chunks()
        )
        vectors = to_numpy(t.column("vector"), self.manifest.dims).astype(np.float32, copy=False)
        sq = (vectors * vectors).sum(1)
        if self.metric == "cos":  # unit length once here, so a query costs one matrix product
            vectors = vectors / np.maximum(np.sqrt(sq), 1e-30)[:, None]
        return vectors, sq, t.column("key").to_numpy(), ids

    def _local(self, rel: str, entry: FileEntry) -> Path:
        """A local path for a version file: itself on local disk; on S3 a cached copy, downloaded whole and
        checked against the manifest's size and sha256 before it is used (a torn download never is)."""
        if not self.store.remote:
            return Path(self.store.path(rel))
        dest = local_cache_root() / rel
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.store.download(rel, dest, sha256=entry.sha256, size=entry.bytes)  # StoreError if it never matches
        return dest

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def loaded_embedder(self) -> Embedder | None:
        """The encoder if it is loaded already (None: not yet)."""
        return self._embedder

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
        """Top-k for each text, embedded as a query by the version's own model."""
        return self.search_vectors(self.embedder.embed_queries(texts), k)

    def search(self, text: str | None = None, vector=None, fingerprint: str | None = None, k: int = 10) -> SearchResult:
        """One query, by ``text`` or by a ``vector`` made in space ``fingerprint``; the hits name this version.

        Raises:
            VersionError: a vector from another space (or of another size), or neither/both of text and vector.
        """
        if (text is None) == (vector is None):
            raise VersionError("search needs exactly one of text or vector")
        if text is not None:
            hits = self.search_text([text], k)[0]
        else:
            if fingerprint != self.fingerprint:
                raise VersionError(
                    f"the vector was made in space {fingerprint}, but version {self.version} is in space "
                    f"{self.fingerprint}; embed the query with that version's model (or search by text)"
                )
            hits = self.search_vectors(np.asarray(vector, dtype=np.float32), k)[0]
        return SearchResult(self.version, self.fingerprint, hits)

    def search_vectors(self, vectors: np.ndarray, k: int = 10, *, exact: bool = False) -> list[list[Hit]]:
        """Top-k over every shard for each query row. ``exact`` brute-forces each shard."""
        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if q.shape[1] != self.manifest.dims:
            raise VersionError(f"query vectors have {q.shape[1]} dims; version {self.version} has {self.manifest.dims}")
        per_query: list[list[list[tuple[float, Any]]]] = [[] for _ in range(len(q))]
        for index, keys_sorted, ids, dead in self.shards:
            for qi, found in enumerate(_search_part(index, q, min(k, len(ids)), dead, exact)):
                rows = np.searchsorted(keys_sorted, np.asarray([key for key, _ in found], dtype=np.uint64))
                per_query[qi].append([(d, ids[r]) for r, (_, d) in zip(rows, found, strict=True)])
        for vectors, sq, _, ids in self.flat:
            for qi, (rows, dists) in enumerate(_exact(vectors, sq, q, min(k, len(ids)), self.metric)):
                per_query[qi].append([(float(d), ids[int(r)]) for r, d in zip(rows, dists, strict=True)])
        return [[Hit(_plain(i), _score(self.metric, d)) for d, i in R.merge_topk(shards, k)] for shards in per_query]


def _exact(
    vectors: np.ndarray, sq: np.ndarray, q: np.ndarray, k: int, metric: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows, distances) of the k nearest of ``vectors`` for each query, best first, in USearch's distance
    terms (cos: 1 - cosine, ``vectors`` of unit length; ip: 1 - dot; l2sq: squared L2, ``sq`` their squared
    norms)."""
    if not len(vectors) or k <= 0:
        return [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)) for _ in q]
    dots = q @ vectors.T
    if metric == "cos":
        dist = 1 - dots / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
    elif metric == "ip":
        dist = 1 - dots
    else:
        dist = (q * q).sum(1, keepdims=True) + sq - 2 * dots
    out = []
    for row in dist:
        top = np.argpartition(row, k - 1)[:k] if k < len(row) else np.arange(len(row))
        top = top[np.argsort(row[top], kind="stable")]
        out.append((top, row[top]))
    return out


def _search_part(index, q: np.ndarray, k: int, dead: np.ndarray, exact: bool) -> list[list[tuple[int, float]]]:
    """(key, distance) of the k nearest live vectors of one part for each query row. With dead keys, asks
    for a few more and, for a query that still has fewer than k live ones, four times as many, until the
    part runs out: tombstones are a small share of a part (index.max_delta_fraction)."""
    n = len(index)
    count = min(n, k if not len(dead) else k + max(8, k // 4))
    while True:
        m = index.search(q, count, exact=exact)
        keys_2d, dists_2d = np.atleast_2d(m.keys), np.atleast_2d(m.distances)
        counts = np.atleast_1d(getattr(m, "counts", None) if hasattr(m, "counts") else len(m))
        out = []
        for qi in range(len(q)):
            c = int(counts[qi])
            keys, dists = keys_2d[qi][:c], dists_2d[qi][:c]
            if len(dead):
                live = live_mask(keys, dead)
                keys, dists = keys[live], dists[live]
            out.append(list(zip(keys[:k].tolist(), dists[:k].astype(float).tolist(), strict=True)))
        if count >= n or all(len(o) >= k for o in out):
            return out
        count = min(n, count * 4)


FLAT_MAX_ROWS = 100_000  # a shard's delta segments up to this many rows are searched exactly, in memory


def group_shards(shards: int, g: int, groups: int) -> list[int]:
    """The shards of group ``g`` of ``groups``: every groups-th shard from g, so the groups stay even in size."""
    if not 0 <= g < groups:
        raise VersionError(f"shard group {g} of {groups} does not exist (groups are 0..{groups - 1})")
    return list(range(g, shards, groups))


def merge_hits(per_group: list[list[Hit]], k: int) -> list[Hit]:
    """The top k of several shard groups' answers to one query: by score, then id, so the same query on the
    same version always gets the same list, whichever group answered first."""
    return heapq.nsmallest(k, (h for hits in per_group for h in hits), key=lambda h: (-h.score, str(h.id)))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value.as_py() if hasattr(value, "as_py") else value  # an Arrow scalar (string ids)


def _read_keys(path: Path) -> tuple[np.ndarray, Any]:
    """(keys, ids) of an embeddings part, which is stored in key order. Integer ids as a numpy array; string
    ids stay one Arrow array (bytes and offsets: about 25 bytes a row where Python strings take about 70)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(str(path), columns=["key", "id"])
    col = t.column("id")
    if pa.types.is_integer(col.type):
        return t.column("key").to_numpy(), col.combine_chunks().to_numpy()
    return t.column("key").to_numpy(), col.cast(pa.large_string()).combine_chunks()  # one array past 2 GiB too
