"""Search a committed version: memory-mapped USearch shards (in memory with delta segments), fan-out, top-k merge.

Queries are embedded with the version's own model, and only after its
fingerprint is recomputed on this machine and matches the manifest's; a vector
query must name the fingerprint it was made with. Nothing ever compares
vectors from two spaces.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embray import filtered
from embray.errors import QueryError, VersionError
from embray.filters import Filter, parse_filter
from embray.keywords import HYBRID_DEPTH, HYBRID_WEIGHTS, RRF_K0, fuse_rrf
from embray.lifecycle.versions import FileEntry, Manifest, file_rel
from embray.models import Embedder, fingerprint, load_embedder
from embray.results import ChunkRef, Hit, SearchResult
from embray.storage import metadata as M
from embray.storage.layout import local_cache_root
from embray.storage.segments import dead_keys, live_mask
from embray.storage.store import Store
from embray.storage.vectors import to_numpy

VECTOR, KEYWORD, HYBRID = "vector", "keyword", "hybrid"  # search modes
MODES = (VECTOR, KEYWORD, HYBRID)


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
    """One committed version opened for search. Shards are memory-mapped read-only; a shard with delta
    segments is loaded into memory with them merged into its graph."""

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

        check_consistent(manifest)
        self.store = store
        self.manifest = manifest
        self.metric = manifest.index.metric
        same_space = shared is not None and shared.fingerprint == manifest.fingerprint
        self._embedder: Embedder | None = shared.loaded_embedder if same_space else None
        # One entry per HNSW graph: index, keys (sorted), ids (numpy or Arrow), and the dead keys to skip
        # (sorted; empty without any). A shard with delta segments (up to MERGE_MAX_ROWS rows in them) is one
        # graph: its base loaded into memory, dead keys removed and the segments' live rows added, so a query
        # costs what it costs on a compacted shard. Past that, its segments are searched as graphs of their own.
        self.chunked = manifest.chunk is not None  # rows are passages: a search answers documents
        self._matches = filtered.MatchCache()  # the rows of each part the filters asked lately let through
        self.shards: list[Part] = []
        mine = set(group_shards(len(manifest.shards), *group)) if group else None
        for s in manifest.shards:
            if encoder_only or s.rows == 0 or not s.parts:
                continue
            if mine is not None and s.shard not in mine:
                continue
            dead = np.zeros(0, dtype=np.uint64)
            if s.tombstones is not None:
                dead = dead_keys(pq.read_table(str(self._local(file_rel(manifest, s.tombstones), s.tombstones))))
            if s.segments and sum(g.rows for g in s.segments) <= MERGE_MAX_ROWS:
                merged = self._merged(s, dead)  # (its keyword indexes stay one per part: dead rows skipped)
                self.shards.append(dataclasses.replace(merged, keywords=self._keywords(s.keyword_files), kw_dead=dead))
                continue
            for (emb, idx, rows), kw in zip(s.parts, s.keyword_files, strict=True):
                index = self._open(s.shard, idx, rows, view=True)
                keys, ids, spans, kept = _read_keys(self._local(file_rel(manifest, emb), emb))
                self.shards.append(Part(index, keys, ids, spans, dead, kept, self._keywords([kw]), dead))

    def _open(self, shard: int, idx: FileEntry, rows: int, *, view: bool):
        """One of the version's USearch files, memory-mapped (``view``) or loaded, checked against the manifest."""
        from usearch.index import Index

        m = self.manifest
        index = Index.restore(str(self._local(file_rel(m, idx), idx)), view=view)
        if index is None or len(index) != rows or index.ndim != m.dims:
            raise VersionError(
                f"shard {shard} of {m.version} does not match its manifest "
                f"({0 if index is None else len(index)} vectors of {getattr(index, 'ndim', '?')} dims in "
                f"{idx.path}, expected {rows} of {m.dims}); run `embray verify`"
            )
        index.expansion_search = m.index.expansion_search
        index.expansion_add = m.index.expansion_add
        return index

    def _merged(self, s, dead: np.ndarray) -> Part:
        """A shard with delta segments as one graph in memory: its base loaded, its dead keys removed, its
        segments' live rows added under their own keys. Returns a part with nothing left to skip."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        m = self.manifest
        emb, idx, rows = s.parts[0]
        index = self._open(s.shard, idx, rows, view=False)
        if len(dead):
            index.remove(dead)
        keys, ids, spans, kept = _read_keys(self._local(file_rel(m, emb), emb))
        if len(dead):  # the entry lists exactly the keys its graph holds
            live = live_mask(keys, dead)
            keys, ids = keys[live], (ids[live] if isinstance(ids, np.ndarray) else ids.filter(pa.array(live)))
            spans = None if spans is None else spans[live]
            kept = None if kept is None else kept.filter(pa.array(live))
        none = np.zeros(0, dtype=np.uint64)
        segs = [str(self._local(file_rel(m, g.embeddings), g.embeddings)) for g in s.segments]
        extra = [] if kept is None else [M.PREFIX + c for c in kept.column_names if c != M.TEXT]
        extra += [M.TEXT] if kept is not None and M.TEXT in kept.column_names else []
        cols = ["key", *_ID_COLUMNS[self.chunked], *extra, "vector"]
        t = pa.concat_tables([pq.read_table(p, columns=cols) for p in segs])
        if len(dead):
            t = t.filter(pa.array(live_mask(t.column("key").to_numpy(), dead)))
        if not t.num_rows:
            return Part(index, keys, ids, spans, none, kept)
        seg_keys = t.column("key").to_numpy()
        index.add(seg_keys, to_numpy(t.column("vector"), m.dims), threads=os.cpu_count() or 1)
        all_keys = np.concatenate([keys, seg_keys])
        order = np.argsort(all_keys, kind="stable")
        col = t.column(_ID_COLUMNS[self.chunked][0])
        if isinstance(ids, np.ndarray):
            all_ids = np.concatenate([ids, col.combine_chunks().to_numpy()])[order]
        else:
            all_ids = pa.concat_arrays([ids, col.cast(pa.large_string()).combine_chunks()]).take(pa.array(order))
        if spans is not None:
            spans = np.concatenate([spans, _spans(t)])[order]
        if kept is not None:
            kept = pa.concat_tables([kept, _kept(t)]).take(pa.array(order))
        return Part(index, all_keys[order], all_ids, spans, none, kept)

    def _keywords(self, entries: list[FileEntry | None]) -> tuple:
        """The BM25 indexes of a shard's parts (memory-mapped), for a version built with index.keywords."""
        if not self.manifest.index.keywords:
            return ()
        from embray.keywords import KeywordIndex

        return tuple(KeywordIndex.open(str(self._local(file_rel(self.manifest, e), e))) for e in entries if e)

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

    def search_text(
        self, texts: list[str], k: int = 10, *, chunks: bool = False, mode: str = VECTOR, weights=None, **where
    ) -> list[list[Hit]]:
        """Top-k for each text: by ``mode`` vector (embedded as a query by the version's own model), keyword
        (:meth:`search_keywords`) or hybrid (:meth:`search_hybrid`, with ``weights``); ``where``: ``filter``,
        ``fields``, as :meth:`search_vectors` takes them."""
        self.check_mode(mode)
        self.check_query(**where)  # (a bad filter is refused before the model is loaded)
        check_weights(weights)
        if mode == KEYWORD:
            return self.search_keywords(texts, k, chunks=chunks, **where)
        if mode == HYBRID:
            return self.search_hybrid(texts, k, chunks=chunks, weights=weights, **where)
        return self.search_vectors(self.embedder.embed_queries(texts), k, chunks=chunks, **where)

    @property
    def columns(self) -> dict[str, str]:
        """The metadata columns this version keeps (name -> kind): what filters and fields may name."""
        return dict(self.manifest.source.columns)

    def filter_of(self, spec) -> Filter | None:
        """``spec`` (a filter as a dict or JSON text, or a parsed :class:`Filter`) checked against this version's
        columns; None for no filter. Raises QueryError naming what is wrong."""
        if spec is None or isinstance(spec, Filter):
            return self.filter_of(spec.to_json()) if isinstance(spec, Filter) else None
        return parse_filter(spec, M.schema(self.columns))

    def matches(self, f: Filter) -> list[filtered.Matches]:
        """Per part, the live rows filter ``f`` lets through (kept for the filters asked most recently)."""
        key = json.dumps(f.to_json(), sort_keys=True, default=str)
        got = self._matches.get(key, lambda: [filtered.matches(part, f) for part in self.shards])
        self._matches.trim()
        return got

    def forget_filters(self) -> None:
        """Drop the cached matches of earlier filters (the next query with each evaluates it again)."""
        self._matches.clear()

    def check_fields(self, fields) -> list[str] | None:
        """``fields`` (names of kept columns, and ``text`` where the version keeps texts), checked."""
        if fields is None:
            return None
        if isinstance(fields, str) or not all(isinstance(f, str) for f in fields):
            raise QueryError('fields: give a list of column names, e.g. ["title", "url"]')
        known = [*self.columns, *([M.TEXT] if self.manifest.source.store_text else [])]
        for name in fields:
            if name not in known:
                have = ", ".join(known) if known else "none (set source.columns or source.store_text and rebuild)"
                raise QueryError(f"fields: unknown field {name!r}; version {self.version} keeps: {have}")
        return list(dict.fromkeys(fields))

    def check_query(self, *, filter=None, fields=None) -> None:  # noqa: A002 - the name users know
        """QueryError for a filter or fields this version cannot answer."""
        self.filter_of(filter)
        self.check_fields(fields)

    def search(
        self,
        text: str | None = None,
        vector=None,
        fingerprint: str | None = None,
        k: int = 10,
        chunks: bool = False,
        **where,
    ) -> SearchResult:
        """One query, by ``text`` or by a ``vector`` made in space ``fingerprint``; the hits name this version.
        ``where``: ``filter`` and ``fields`` (:meth:`search_vectors`).

        Raises:
            VersionError: a vector from another space (or of another size), or neither/both of text and vector.
            QueryError: a filter or fields this version cannot answer.
        """
        if (text is None) == (vector is None):
            raise VersionError("search needs exactly one of text or vector")
        if text is not None:
            hits = self.search_text([text], k, chunks=chunks, **where)[0]
        elif where.get("mode", VECTOR) != VECTOR:
            raise QueryError(f"mode {where['mode']} searches by text: send the query's text, not a vector")
        else:
            if fingerprint != self.fingerprint:
                raise VersionError(
                    f"the vector was made in space {fingerprint}, but version {self.version} is in space "
                    f"{self.fingerprint}; embed the query with that version's model (or search by text)"
                )
            where = {key: v for key, v in where.items() if key not in ("mode", "weights")}
            hits = self.search_vectors(np.asarray(vector, dtype=np.float32), k, chunks=chunks, **where)[0]
        return SearchResult(self.version, self.fingerprint, hits)

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = 10,
        *,
        exact: bool = False,
        chunks: bool = False,
        filter=None,  # noqa: A002 - the name users know
        fields=None,
    ) -> list[list[Hit]]:
        """Top-k over every shard for each query row. ``exact`` brute-forces each shard.

        ``filter``: only rows whose metadata matches (:mod:`embray.filters`), searched exactly over the matching
        rows where they are few, else on the graph with bounded oversampling (:func:`_search_allowed`).
        ``fields``: the kept columns (and ``text``) each hit carries.

        In a chunked version a hit is a document, scored by its best passage (``Hit.chunk``), and ``k`` counts
        documents: each part is asked for more passages than ``k`` (:data:`PASSAGES_PER_HIT` times, then four
        times as many for a query whose passages name fewer than ``k`` documents, until the part runs out).
        ``chunks``: the top-k passages themselves, several of one document if they score so."""
        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if q.shape[1] != self.manifest.dims:
            raise VersionError(f"query vectors have {q.shape[1]} dims; version {self.version} has {self.manifest.dims}")
        f, fields = self.filter_of(filter), self.check_fields(fields)
        got = None if f is None else self.matches(f)
        return self._collect(len(q), k, chunks, lambda todo, want: self._top(q[todo], want, exact, got), fields)

    def search_keywords(
        self,
        texts: list[str],
        k: int = 10,
        *,
        chunks: bool = False,
        filter=None,  # noqa: A002 - the name users know
        fields=None,
    ) -> list[list[Hit]]:
        """Top-k for each text by BM25 over the version's keyword index (index.keywords): a hit's score is
        its BM25 score (rows that share no term with the text are never hits). ``filter``, ``fields`` and
        ``chunks`` as in :meth:`search_vectors` (a chunked version's documents by their best passage).

        Raises:
            QueryError: the version has no keyword index, or a filter or fields it cannot answer.
        """
        self.check_mode(KEYWORD)
        f, fields = self.filter_of(filter), self.check_fields(fields)
        allowed = None if f is None else [m.keys for m in self.matches(f)]
        texts = list(texts)
        top = lambda todo, want: self._top_keywords([texts[i] for i in todo], want, allowed)  # noqa: E731
        return self._collect(len(texts), k, chunks, top, fields, keyword=True)

    def search_hybrid(
        self, texts: list[str], k: int = 10, *, chunks: bool = False, weights=None, **where
    ) -> list[list[Hit]]:
        """Top-k for each text by reciprocal rank fusion (:func:`fuse_hits`) of its vector and its keyword
        answers (each :func:`hybrid_depth` deep, under the same filter); ``weights``: {"vector": w, "keyword": w}."""
        self.check_mode(HYBRID)
        depth = hybrid_depth(k)
        vec = self.search_text(texts, depth, chunks=chunks, **where)
        kw = self.search_keywords(texts, depth, chunks=chunks, **where)
        return [fuse_hits(v, w, k, weights, chunks) for v, w in zip(vec, kw, strict=True)]

    def check_mode(self, mode: str) -> str:
        """``mode`` if this version can answer it: vector always, keyword and hybrid with a keyword index."""
        if mode not in MODES:
            raise QueryError(f"mode: {mode!r} is not a search mode; use one of {', '.join(MODES)}")
        if mode != VECTOR and not self.manifest.index.keywords:
            raise QueryError(
                f"mode {mode}: version {self.version} has no keyword index; set index.keywords: true and build a "
                "new version (embray backfill), or search with mode vector"
            )
        return mode

    def _collect(self, n: int, k: int, chunks: bool, top, fields, keyword: bool = False) -> list[list[Hit]]:
        """Each of ``n`` queries' top k from ``top(query positions, want)`` (candidates per query: (distance,
        part, row), best first); a chunked version's documents by their best passage, asking again four times
        deeper for a query whose candidates name fewer than ``k`` documents while a part may hold more."""
        group = self.chunked and not chunks
        out: list[list[Hit] | None] = [None] * n
        want, todo = k * (PASSAGES_PER_HIT if group else 1), list(range(n))
        while todo:
            found, short = top(todo, want), []
            for qi, hits in zip(todo, found, strict=True):
                best = self._best_per_document(hits, k) if group else hits[:k]
                out[qi] = best
                if group and len(best) < k and len(hits) >= want:  # a part may hold more documents
                    short.append(qi)
            todo, want = short, want * 4
        return [[self._hit(d, part, row, fields, keyword) for d, part, row in hits] for hits in out]

    def _top_keywords(self, texts: list[str], want: int, allowed=None) -> list[list[tuple[float, int, int]]]:
        """Per text, the ``want`` best BM25 rows over every part's keyword indexes: (-score, part, row)."""
        per_query: list[list[tuple[float, int, int]]] = [[] for _ in texts]
        for p, part in enumerate(self.shards):
            for kw in part.keywords:
                ok = None if allowed is None else allowed[p]
                for qi, found in enumerate(kw.search(texts, want, allowed=ok, dead=part.kw_dead)):
                    rows = np.searchsorted(part.keys, np.asarray([key for key, _ in found], dtype=np.uint64))
                    per_query[qi].extend((-score, p, int(r)) for r, (_, score) in zip(rows, found, strict=True))
        return [heapq.nsmallest(want, hits, key=self._order) for hits in per_query]

    def _top(self, q: np.ndarray, want: int, exact: bool, got=None) -> list[list[tuple[float, int, int]]]:
        """Per query row, the ``want`` nearest live rows over every part (``got``: per part, the rows a filter
        lets through, :func:`filtered.matches`): (distance, part, row), best first."""
        per_query: list[list[list[tuple[float, int, int]]]] = [[] for _ in range(len(q))]
        for p, part in enumerate(self.shards):
            if got is None:
                hits = _search_part(part.index, q, min(want, len(part.keys)), part.dead, exact)
            else:
                k = min(want, len(got[p].keys))
                hits = filtered.search_matches(part.index, part.keys, q, k, got[p], exact, self.metric)
            for qi, found in enumerate(hits):
                rows = np.searchsorted(part.keys, np.asarray([key for key, _ in found], dtype=np.uint64))
                per_query[qi].append([(d, p, int(r)) for r, (_, d) in zip(rows, found, strict=True)])

        return [heapq.nsmallest(want, (x for hits in shards for x in hits), key=self._order) for shards in per_query]

    def _order(self, x: tuple[float, int, int]):
        """Equal distances by id (then passage): the same answer in any order."""
        part = self.shards[x[1]]
        return x[0], str(_plain(part.ids[x[2]])), 0 if part.spans is None else int(part.spans[x[2], 0])

    def _best_per_document(self, hits: list[tuple[float, int, int]], k: int) -> list[tuple[float, int, int]]:
        """The first (best) passage of each of the first ``k`` documents among ``hits`` (best first)."""
        seen, out = set(), []
        for hit in hits:
            doc = _plain(self.shards[hit[1]].ids[hit[2]])
            if doc not in seen:
                seen.add(doc)
                out.append(hit)
                if len(out) == k:
                    break
        return out

    def _hit(self, distance: float, p: int, row: int, fields: list[str] | None = None, keyword: bool = False) -> Hit:
        part = self.shards[p]
        chunk = None if part.spans is None else ChunkRef(*(int(v) for v in part.spans[row]))
        kept = None if fields is None else {f: part.kept.column(f)[row].as_py() for f in fields}
        return Hit(_plain(part.ids[row]), -distance if keyword else _score(self.metric, distance), chunk, kept)


# Hybrid search fuses each side's answer HYBRID_DEPTH deep (at least k) by reciprocal rank fusion with k0 RRF_K0
# and weights HYBRID_WEIGHTS (vector, keyword): the settings that met the known-item target (bench/known_items.py,
# docs/notes/issue28-keywords.md).


def hybrid_depth(k: int) -> int:
    return max(k, HYBRID_DEPTH)


def check_weights(weights) -> None:
    """QueryError unless ``weights`` is None or {"vector": w, "keyword": w} of finite numbers >= 0, not both 0."""
    if weights is None:
        return
    if not isinstance(weights, dict) or not set(weights) <= {VECTOR, KEYWORD}:
        raise QueryError('weights: give {"vector": w, "keyword": w} (either may be left out: 1)')
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise QueryError(f"weights.{name}: {w!r} is not a finite number >= 0")
    if all(weights.get(m, 1.0) == 0 for m in (VECTOR, KEYWORD)):
        raise QueryError("weights: both are 0, so nothing would rank; give one a weight above 0")


def fuse_hits(
    vector: list[Hit], keyword: list[Hit], k: int, weights: dict | None = None, passages: bool = False
) -> list[Hit]:
    """The top ``k`` of two answers to one query fused by reciprocal rank fusion: a hit's score is the sum over
    the answers holding it of weight / (RRF_K0 + its rank there) (weights: {"vector": w, "keyword": w}; by
    default :data:`HYBRID_WEIGHTS`). A hit is its id (a chunked version's document, whichever passage scored),
    or with ``passages`` (``chunks=True`` answers) its id and passage; it keeps the vector answer's passage
    and fields where both answers hold it."""
    w = {VECTOR: HYBRID_WEIGHTS[0], KEYWORD: HYBRID_WEIGHTS[1], **(weights or {})}
    ident = [[(h.id, h.chunk.ordinal if passages and h.chunk else None) for h in hits] for hits in (vector, keyword)]
    first: dict = {}
    for key, hit in zip(ident[1] + ident[0], keyword + vector, strict=True):
        first[key] = hit  # (the vector answer's, where both hold it)
    fused = fuse_rrf(ident, [w[VECTOR], w[KEYWORD]], k0=RRF_K0, limit=k)
    return [dataclasses.replace(first[key], score=float(score)) for key, score in fused]


# A chunked version's search first asks each part for this many passages per document wanted.
PASSAGES_PER_HIT = 4
_ID_COLUMNS = {False: ["id"], True: ["doc", "ordinal", "start", "end"]}  # what a hit names, per kind of version


@dataclass(frozen=True)
class Part:
    """One HNSW graph of a version opened for search: its keys (sorted), the id of each (numpy or Arrow), a
    chunked version's passage of each (ordinal, start, end; else None), the dead keys to skip (sorted), and
    the metadata the version keeps of each row (an Arrow table, columns under their own names and ``text``;
    None without any)."""

    index: Any
    keys: np.ndarray
    ids: Any
    spans: np.ndarray | None
    dead: np.ndarray
    kept: Any = None
    keywords: tuple = ()  # the BM25 indexes of its rows (index.keywords): one, or a merged shard's base and segments
    kw_dead: np.ndarray | None = None  # the keys its keyword indexes must skip (the shard's tombstones)


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


# A shard's delta segments up to this many rows are merged into its base's graph when a version is opened
# (about 1 s per 4,000 rows on one core here); past it they are searched as graphs of their own.
MERGE_MAX_ROWS = 100_000


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


def _read_keys(path: Path) -> tuple[np.ndarray, Any, np.ndarray | None, Any]:
    """(keys, ids, spans, kept) of an embeddings part, which is stored in key order. Integer ids as a numpy
    array; string ids stay one Arrow array (bytes and offsets: about 25 bytes a row where Python strings take
    about 70). A chunked version's part names each row's document (its ids) and passage (spans: ordinal,
    start, end per row; None for other parts). ``kept``: the metadata columns and text (:func:`_kept`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = pq.read_schema(str(path)).names
    chunked = "doc" in names
    extra = [c for c in names if c.startswith(M.PREFIX) or c == M.TEXT]
    t = pq.read_table(str(path), columns=["key", *_ID_COLUMNS[chunked], *extra])
    col = t.column(_ID_COLUMNS[chunked][0])
    spans = _spans(t) if chunked else None
    kept = _kept(t) if extra else None
    if pa.types.is_integer(col.type):
        return t.column("key").to_numpy(), col.combine_chunks().to_numpy(), spans, kept
    return t.column("key").to_numpy(), col.cast(pa.large_string()).combine_chunks(), spans, kept  # (past 2 GiB)


def _kept(t):
    """The metadata columns (under their own names) and the text of a part's table."""
    import pyarrow as pa

    cols = {c[len(M.PREFIX) :]: t.column(c).combine_chunks() for c in t.column_names if c.startswith(M.PREFIX)}
    if M.TEXT in t.column_names:
        cols[M.TEXT] = t.column(M.TEXT).combine_chunks()
    return pa.table(cols)


def _spans(t) -> np.ndarray:
    """(rows, 3) int64: each passage's ordinal, start and end."""
    return np.stack([t.column(c).to_numpy().astype(np.int64) for c in ("ordinal", "start", "end")], axis=1)
