"""``embray.Collection``: the one object users and every front end (CLI, jobs, Serve, monitor) hold.

    from embray import Collection

    docs = Collection.open("embray.yaml")
    built = docs.backfill()                      # BuildResult; the first version becomes `active`
    docs.refresh(promote=True)                   # only what changed, through the gates
    docs.search("parse a date string", k=5)      # SearchResult from the active version
    ds = docs.dataset()                          # the active version's rows as a Ray Dataset

A collection owns its config, its store and its MLflow registry, each made once (lazily). Every
method takes the options of its CLI command and returns a typed, frozen result whose ``to_dict()``
is that command's ``--json`` output.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from embray.cache import VersionCache
from embray.config import Config, load_config, load_model_spec, parse_config, parse_model_spec
from embray.context import Context
from embray.errors import ConfigError, QueryError, VersionError
from embray.lifecycle import aliases as _aliases
from embray.lifecycle import flows
from embray.lifecycle import gc as _gc
from embray.lifecycle.registry import ACTIVE
from embray.lifecycle.verify import verify as _verify
from embray.lifecycle.versions import Manifest, file_rel, is_version_id, list_versions, read_manifest
from embray.models.spec import ModelSpec
from embray.pipeline.types import SPAN_COLUMNS
from embray.progress import Progress
from embray.quality import monitor
from embray.quality import retrieval as quality
from embray.results import (
    AuditReport,
    BuildResult,
    EvalReport,
    GateReport,
    GcResult,
    PlanResult,
    PromoteResult,
    RollbackResult,
    SearchResult,
    StatusReport,
    VerifyReport,
    VersionInfo,
)
from embray.runtime import init_ray
from embray.search import VersionIndex
from embray.storage import metadata as M
from embray.storage.layout import version_dir
from embray.storage.segments import read_tombstones
from embray.storage.store import Store

if TYPE_CHECKING:
    import ray.data

    from embray.lifecycle.registry import Registry

_OPEN_VERSIONS = 2  # opened versions kept (each with its encoder): the current one and the one before


class Collection:
    """One managed embedding collection: its config, store and MLflow registry, and every operation on it.

    Args:
        config: A validated :class:`Config`, or a mapping of the YAML's keys (relative paths resolve
            against ``base_dir``).
        base_dir: Directory relative paths in a mapping resolve against (default: the working directory).
        progress: Where builds report their stages and how far they got (e.g. :class:`TerminalProgress`);
            default: nowhere.

    Raises:
        ConfigError: ``config`` is not a valid configuration.
    """

    def __init__(
        self,
        config: Config | Mapping[str, Any],
        *,
        base_dir: str | os.PathLike[str] = ".",
        progress: Progress | None = None,
    ):
        if isinstance(config, Config):
            cfg = config
        elif isinstance(config, Mapping):
            cfg = parse_config(dict(config), base_dir=base_dir)
        else:
            raise ConfigError(
                f"Collection() takes a Config or a mapping of config keys, not {type(config).__name__}; "
                "use Collection.open('embray.yaml') for a file"
            )
        self._ctx = Context(cfg, progress)
        self._indexes: VersionCache[VersionIndex] = VersionCache(_OPEN_VERSIONS)
        self._active: tuple[str, float] | None = None  # (version, monotonic time it was read)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], overrides: dict[str, Any] | None = None, *, progress: Progress | None = None
    ) -> Collection:
        """Open the collection described by a YAML config file.

        Args:
            path: The ``embray.yaml`` file; relative paths in it resolve against its directory.
            overrides: Top-level keys that replace the file's (e.g. ``{"store": {...}}``).

        Raises:
            ConfigError: The file is missing, not YAML, or not a valid configuration.
        """
        return cls(load_config(path, overrides), progress=progress)

    def __repr__(self) -> str:
        return f"Collection({self.name!r}, store={self.config.store.uri!r})"

    # --- handles --------------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        return self._ctx.cfg

    @property
    def name(self) -> str:
        return self._ctx.collection

    @property
    def store(self) -> Store:
        """The version store (local disk or S3), made on first use."""
        return self._ctx.store

    @property
    def registry(self) -> Registry:
        """The MLflow registry of ``embray.<name>``, made on first use."""
        return self._ctx.registry

    @property
    def context(self) -> Context:
        """Config, store and registry together, as the library's operations take them."""
        return self._ctx

    # --- builds ---------------------------------------------------------------------------------
    def backfill(self, *, promote: bool = True) -> BuildResult:
        """Embed the whole source corpus into a new version.

        Args:
            promote: Make the first version of the collection ``active`` (later ones never are).

        Returns:
            The committed version's :class:`BuildResult`.

        Raises:
            ConflictError: Another job writes this collection.
            SourceError: The corpus is missing, unreadable, or has no embeddable rows.
            StoreError, RegistryError, ModelError: The store, MLflow or the model failed; nothing is visible.
        """
        result = flows.backfill(self._ctx, promote=promote)
        self._alias_moved()
        return result

    def refresh(
        self, parent: str | None = None, *, dry_run: bool = False, promote: bool = False
    ) -> BuildResult | PlanResult:
        """Re-embed only the rows that changed since a version, into a child version.

        Args:
            parent: The version (or alias) to refresh; default ``active``.
            dry_run: Only report what changed and what a refresh would cost (a :class:`PlanResult` with
                ``estimate``); embed and write nothing.
            promote: Make the child ``active`` through the promotion gates.

        Returns:
            :class:`BuildResult`, or :class:`PlanResult` for a dry run.

        Raises:
            VersionError: The config's model is not the parent's (use :meth:`migrate`).
            GateError: ``promote`` and the child failed a gate (it stays committed, not active).
            ConflictError: Another job writes this collection.
        """
        parent_id = self._id(parent) if parent else None
        if dry_run:
            return flows.plan_refresh(self._ctx, parent_id)
        try:
            return flows.refresh(self._ctx, parent=parent_id, promote_it=promote)
        finally:
            self._alias_moved()

    def compact(self, version: str | None = None, *, promote: bool = False) -> BuildResult:
        """Fold a version's delta segments and tombstones into one index per shard: a child version with the
        same rows and vectors (nothing re-embedded, the corpus not read), searched as fast as a fresh backfill.

        Args:
            version: The version (or alias) to compact; default ``active``.
            promote: Make the child ``active`` through the promotion gates.

        Returns:
            The child's :class:`BuildResult` (``counts.reused`` = its rows; ``manifest.counts.shards_reused``
            the shards that had nothing to compact).

        Raises:
            VersionError: The version has no delta segments or tombstones (nothing to compact).
            GateError: ``promote`` and the child failed a gate (it stays committed, not active).
            ConflictError: Another job writes this collection.
        """
        vid = self._id(version) if version else None
        try:
            return flows.compact(self._ctx, version=vid, promote_it=promote)
        finally:
            self._alias_moved()

    def migrate(
        self, model: ModelSpec | Mapping[str, Any] | str | os.PathLike[str], *, dry_run: bool = False
    ) -> BuildResult | PlanResult:
        """Re-embed the whole collection with another model into a version marked ``candidate``.

        Args:
            model: The new :class:`ModelSpec`, a mapping of its keys, or a YAML file holding it.
            dry_run: Only report what it would embed and cost (a :class:`PlanResult` with ``estimate``).

        Raises:
            VersionError: The model is the active version's (use :meth:`refresh`).
            ConfigError: The model spec is invalid.
        """
        if isinstance(model, str | os.PathLike):
            spec = load_model_spec(model)
        elif isinstance(model, Mapping):
            spec = parse_model_spec(dict(model))
        else:
            spec = model
        if dry_run:
            return flows.plan_migrate(self._ctx, spec)
        result = flows.migrate(self._ctx, spec)
        self._alias_moved()
        return result

    # --- versions and aliases -------------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        """Committed versions, oldest first, with their aliases (read-only).

        Returns:
            One :class:`VersionInfo` per committed version (``embray versions --json``).

        Raises:
            StoreError, RegistryError: The store or MLflow cannot be read.
        """
        manifests = list_versions(self.store, self.name)
        registered = self.registry.registered_versions() if manifests else set()
        by_version: dict[str, list[str]] = {}
        for alias, vid in self.aliases().items():
            by_version.setdefault(vid, []).append(alias)
        return [
            VersionInfo(
                id=m.version,
                model=m.model.label,
                fingerprint=m.fingerprint,
                rows=m.rows,
                rejected=m.counts.rejected,
                dims=m.dims,
                shards=len(m.shards),
                created=m.created,
                parent=m.parent,
                aliases=sorted(by_version.get(m.version, [])),
                registered=m.version in registered,
                chunk={"tokens": m.chunk.tokens, "overlap": m.chunk.overlap} if m.chunk else None,
                documents=m.counts.documents,
                columns=dict(m.source.columns),
                keywords=m.index.keywords,
            )
            for m in manifests
        ]

    def aliases(self) -> dict[str, str]:
        """The collection's aliases, read from MLflow now.

        Returns:
            alias (``active``, ``candidate``) -> version id.

        Raises:
            RegistryError: MLflow cannot be reached.
        """
        return self.registry.aliases()

    def resolve(self, version_or_alias: str | None = None) -> str:
        """The version id that ``version_or_alias`` names.

        Args:
            version_or_alias: A version id or an alias name; default ``active``.

        Returns:
            The version id, a string.

        Raises:
            VersionError: No such alias or committed version.
        """
        name = version_or_alias or ACTIVE
        aliases = self.aliases()
        if name in aliases:
            return aliases[name]
        if name in (ACTIVE, "candidate"):
            return flows.resolve(self._ctx, None, name)  # raises, saying how to make one
        read_manifest(self.store, self.name, name)  # raises VersionError naming it when it is not committed
        return name

    def manifest(self, version: str | None = None) -> Manifest:
        """The committed manifest of a version.

        Args:
            version: A version id or alias; default ``active``.

        Raises:
            VersionError: No such committed version, or its manifest is malformed.
        """
        return read_manifest(self.store, self.name, self.resolve(version))

    def verify(self, version: str) -> VerifyReport:
        """Check a version: files and checksums, one fingerprint, row counts, unique and well-placed ids.

        Args:
            version: A version id or alias.

        Returns:
            :class:`VerifyReport`; ``ok`` is false and ``problems`` names each problem when it is not sound
            (a version that is not committed is a problem in the report, not an error).
        """
        vid = self.aliases().get(version, version) if not is_version_id(version) else version
        return _verify(self.store, self.name, vid)

    def gates(self, version: str, *, queries: str | None = None) -> GateReport:
        """Run the promotion gates (verify, ANN recall@10, labelled nDCG@10) without promoting.

        Args:
            version: A version id or alias.
            queries: Labelled JSONL for the nDCG gate (default ``monitor.queries``).

        Returns:
            :class:`GateReport` with each gate's number and threshold.
        """
        return quality.check_gates(self._ctx, self._id(version), queries=queries)

    def promote(
        self, version: str, *, reason: str | None = None, queries: str | None = None, force: bool = False
    ) -> PromoteResult:
        """Make ``version`` active once it passes the gates.

        Args:
            version: Version id or alias (e.g. ``"candidate"``).
            reason: Why; recorded in MLflow with who and when. Required with ``force``.
            queries: Labelled JSONL for the nDCG gate (default ``monitor.queries``).
            force: Override failed quality gates (never verify).

        Raises:
            GateError: A gate refused it; the message has the numbers.
            ConfigError: ``force`` without a ``reason``.
        """
        try:
            return _aliases.promote(self._ctx, self._id(version), reason=reason or "", force=force, queries=queries)
        finally:
            self._alias_moved()

    def rollback(self, *, reason: str | None = None) -> RollbackResult:
        """Make the previously active version active again.

        Raises:
            VersionError: There is no earlier active version.
        """
        try:
            return _aliases.rollback(self._ctx, reason=reason or "")
        finally:
            self._alias_moved()

    def gc(self, keep: int, *, dry_run: bool = False) -> GcResult:
        """Delete old versions that no alias points at and no kept version reuses, failed builds, unused caches.

        Args:
            keep: Newest versions to keep (aliased ones always stay); at least 1.
            dry_run: Only report what would be deleted.

        Raises:
            ConfigError: ``keep`` < 1.
            ConflictError: Another job writes this collection.
        """
        return _gc.gc(self._ctx, keep=keep, dry_run=dry_run)

    # --- search ---------------------------------------------------------------------------------
    def index(self, version: str | None = None) -> VersionIndex:
        """A searchable, memory-mapped version, opened once and reused.

        The ``active`` alias is re-read at most every ``serve.poll_s`` seconds (at once after this
        object moved it), so a loop of searches neither reloads shards nor asks MLflow each time.

        Args:
            version: A version id or alias; default ``active``.

        Returns:
            The :class:`VersionIndex` (its encoder loads on the first text query).

        Raises:
            VersionError: No such version, or it mixes fingerprints.
        """
        vid = self._active_version() if version in (None, ACTIVE) else self._id(version)

        def load() -> VersionIndex:  # a refresh's parent shares its encoder with the version opened before it
            return VersionIndex(self.store, read_manifest(self.store, self.name, vid), shared=self._indexes.newest())

        return self._indexes.open(vid, load)

    def search(
        self,
        text: str | None = None,
        vector: Any = None,
        fingerprint: str | None = None,
        k: int = 10,
        version: str | None = None,
        chunks: bool = False,
        filter: dict | str | None = None,  # noqa: A002 - the name users know from every vector store
        fields: list[str] | None = None,
        mode: str = "vector",
        weights: dict[str, float] | None = None,
    ) -> SearchResult:
        """Top-k from one version (default ``active``), by ``text`` or by a ``vector`` made in space ``fingerprint``.

        A text is embedded with the version's own model; a vector from another space is refused. In a version
        of chunked documents (``chunk:``), a hit is a document (its source id), scored by its best passage, which
        ``Hit.chunk`` names (ordinal and character span); ``k`` counts documents.

        Args:
            text: The query text; or
            vector: a query vector, with
            fingerprint: the fingerprint of the model that made it.
            k: Results to return, 1..1000.
            version: A version id or alias; default ``active``.
            chunks: In a chunked version, the top-k passages themselves instead of documents.
            filter: Only rows whose metadata (``source.columns``) matches, e.g.
                ``{"tenant": "acme", "published": {"$gte": "2026-01-01"}}`` (:mod:`embray.filters`).
            fields: Kept columns (and ``text`` with ``source.store_text``) each hit carries in ``Hit.fields``.
            mode: ``vector`` (default), ``keyword`` (BM25; a version built with ``index.keywords``) or ``hybrid``
                (both, fused by reciprocal rank: the hit's score is the fused score). Keyword and hybrid take text.
            weights: Hybrid only: ``{"vector": w, "keyword": w}`` (1 each by default).

        Returns:
            :class:`SearchResult`, best first, naming the version and its fingerprint.

        Raises:
            VersionError: No such version, a vector without the version's fingerprint, or a wrong size.
            QueryError: A filter or fields the version cannot answer (the message names the column or operator).
            ConfigError: ``k`` outside 1..1000.
        """
        if not 1 <= k <= 1000:
            raise ConfigError(f"k={k}: ask for 1 to 1000 results")
        index = self.index(version)
        where = {"filter": filter, "fields": fields, "mode": mode, "weights": weights}
        return index.search(text=text, vector=vector, fingerprint=fingerprint, k=k, chunks=chunks, **where)

    def search_many(
        self,
        texts: list[str] | None = None,
        vectors: Any = None,
        fingerprint: str | None = None,
        k: int = 10,
        version: str | None = None,
        chunks: bool = False,
        filter: dict | str | None = None,  # noqa: A002 - the name users know from every vector store
        fields: list[str] | None = None,
        mode: str = "vector",
        weights: dict[str, float] | None = None,
    ) -> list[SearchResult]:
        """Top-k for each of many queries from one version (default ``active``), in one call: ``texts`` are
        embedded in one batch by the version's own model, or ``vectors`` (rows) were made in space ``fingerprint``.
        ``filter``, ``fields``, ``mode`` and ``weights`` apply to every query (as in :meth:`search`; keyword and
        hybrid take ``texts``).

        Returns:
            One :class:`SearchResult` per query, in order, all from the same version.

        Raises:
            VersionError: No such version, vectors from another space, or neither/both of texts and vectors.
            QueryError: A filter or fields the version cannot answer.
            ConfigError: ``k`` outside 1..1000, or no query.
        """
        if not 1 <= k <= 1000:
            raise ConfigError(f"k={k}: ask for 1 to 1000 results")
        if (texts is None) == (vectors is None):
            raise VersionError("search_many needs exactly one of texts or vectors")
        index = self.index(version)
        if texts is not None:
            if isinstance(texts, str) or not texts:
                raise ConfigError("texts: give a non-empty list of query texts")
            where = {"filter": filter, "fields": fields, "mode": mode, "weights": weights}
            found = index.search_text(list(texts), k, chunks=chunks, **where)
        else:
            if fingerprint != index.fingerprint:
                raise VersionError(
                    f"the vectors were made in space {fingerprint}, but version {index.version} is in space "
                    f"{index.fingerprint}; embed the queries with that version's model (or search by text)"
                )
            import numpy as np

            if mode != "vector":
                raise QueryError(f"mode {mode} searches by text: pass texts, not vectors")
            q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
            found = index.search_vectors(q, k, chunks=chunks, filter=filter, fields=fields)
        return [SearchResult(index.version, index.fingerprint, hits) for hits in found]

    def dataset(self, version: str | None = None) -> ray.data.Dataset:
        """A version's rows (``id``, ``content_hash``, ``vector``) as a Ray Dataset, read from its embeddings
        parts as the manifest lists them (a refreshed version's include the parts it reuses from its parent). A
        version of chunked documents has a row per passage, with its document's id (``doc``) and its ``ordinal``,
        ``start`` and ``end`` in the document's text (``id`` is ``<doc>#<ordinal>#<start>``). The metadata columns
        the version keeps (``source.columns``) follow under their own names, and ``text`` with ``source.store_text``.

        The vectors are float32, L2-normalised, exactly as stored. Connects to (or starts) the configured Ray.

        Args:
            version: A version id or alias; default ``active``.

        Returns:
            A lazy ``ray.data.Dataset``; in numpy batches ``np.stack(batch["vector"])`` is (rows, dims).

        Raises:
            VersionError: No such committed version.
        """
        import ray.data

        m = self.manifest(version)
        paths, dead = [], {}
        for s in m.shards:
            if not s.rows:
                continue
            tomb = read_tombstones(self.store, file_rel(m, s.tombstones) if s.tombstones else None)
            for emb, _, _ in s.parts:  # the base, then delta segments
                paths.append(self.store.path(file_rel(m, emb)))
                if len(tomb):
                    dead[paths[-1]] = tomb
        init_ray(self.config.ray)
        fs = self.store.pyarrow_fs() if self.store.remote else None
        kept = [M.PREFIX + c for c in m.source.columns] + ([M.TEXT] if m.source.store_text else [])
        columns = ["id", "content_hash", "vector", *(SPAN_COLUMNS if m.chunk else []), *kept]
        bare = {M.PREFIX + c: c for c in m.source.columns}
        if not dead:
            ds = ray.data.read_parquet(paths, filesystem=fs, columns=columns)
        else:
            ds = ray.data.read_parquet(paths, filesystem=fs, columns=[*columns, "key"], include_paths=True)
            ds = ds.map_batches(_LiveOnly(dead), batch_format="pyarrow").select_columns(columns)
        return ds.rename_columns(bare) if bare else ds

    # --- monitoring -----------------------------------------------------------------------------
    def status(self, *, verify: bool = True, staleness: bool = True) -> StatusReport:
        """Is the collection current, consistent and served as its alias says?

        Args:
            verify: Verify every aliased version (reads every file).
            staleness: Measure the active version's staleness (a dry-run refresh on Ray).

        Returns:
            :class:`StatusReport`; ``ok`` is false and ``problems`` says why when a threshold is broken.
        """
        return monitor.status(self._ctx, check_verify=verify, check_staleness=staleness)

    def eval(
        self, version: str, *, against: str | None = None, queries: str | None = None, sample: int | None = None
    ) -> EvalReport:
        """Measure a version: ANN recall@10 vs exact, overlap@10 with ``against``, labelled nDCG@10.

        Results are logged to the version's MLflow run and tags.

        Args:
            version: A version id or alias.
            against: Another version: overlap@10 of their results on sampled source texts.
            queries: Labelled JSONL (default ``monitor.queries``): nDCG@10 and recall@10.
            sample: Sampled queries (default ``monitor.eval_sample``).

        Returns:
            :class:`EvalReport`.
        """
        other = self._id(against) if against else None
        return quality.evaluate(self._ctx, self._id(version), against=other, queries=queries, sample=sample)

    def audit(
        self, version: str, *, sample: int | None = None, min_cosine: float | None = None, seed: int | None = None
    ) -> AuditReport:
        """Re-embed a sample of a version's rows and compare them with the stored vectors.

        Args:
            version: A version id or alias.
            sample: Rows to re-embed (default ``monitor.audit_sample``).
            min_cosine: Threshold (default ``monitor.audit_min_cosine``).
            seed: Sample seed (default: a fresh random sample).

        Returns:
            :class:`AuditReport`; ``ok`` is false on drift or a changed fingerprint.
        """
        return quality.audit(self._ctx, self._id(version), sample=sample, min_cosine=min_cosine, seed=seed)

    def check(self, *, promote_if_gates_pass: bool = False) -> StatusReport:
        """One monitor step: status; a refresh when stale; optionally a gated promotion.

        Args:
            promote_if_gates_pass: Promote what a refresh built, through the gates.

        Returns:
            :class:`StatusReport` whose ``action`` says what was done.
        """
        try:
            return monitor.check_once(self._ctx, promote_if_gates_pass=promote_if_gates_pass)
        finally:
            self._alias_moved()

    def monitor(
        self,
        *,
        interval_s: float | None = None,
        iterations: int | None = None,
        promote_if_gates_pass: bool = False,
        on_check: Callable[[StatusReport], None] | None = None,
    ) -> list[StatusReport]:
        """Run :meth:`check` on an interval; each check is logged to one MLflow run and written for Serve's gauges.

        A failed check (MLflow, the store or the source unreachable) is a data point; the loop goes on.

        Args:
            interval_s: Seconds between checks (default ``monitor.interval_s``).
            iterations: Stop after this many checks (default: until interrupted).
            promote_if_gates_pass: Promote what a refresh built, through the gates.
            on_check: Called with each check's :class:`StatusReport` as it happens.

        Returns:
            Every check's :class:`StatusReport`.
        """
        try:
            return monitor.run_monitor(
                self._ctx,
                interval_s=interval_s,
                iterations=iterations,
                promote_if_gates_pass=promote_if_gates_pass,
                on_check=on_check,
            )
        finally:
            self._alias_moved()

    def record_status(self, st: StatusReport) -> None:
        """Write a status where the Serve app exports it as gauges (``<collection>/_status/status.json``)."""
        monitor.record_status(self._ctx, st)

    def last_status(self) -> StatusReport | None:
        """The status the monitor last recorded, or None."""
        return monitor.read_status(self.store, self.name)

    def version_uri(self, version: str) -> str:
        """The store URI of a version's directory."""
        return self.store.url(version_dir(self.name, self._id(version)))

    # --- helpers --------------------------------------------------------------------------------
    def _id(self, version: str) -> str:
        """A version id from an id or an alias name, without a round trip for plain ids."""
        if is_version_id(version):
            return version
        return self.resolve(version)

    def _active_version(self) -> str:
        now = time.monotonic()
        cached = self._active
        if cached is None or now - cached[1] > self.config.serve.poll_s:
            cached = self._active = (flows.resolve(self._ctx, None), now)
        return cached[0]

    def _alias_moved(self) -> None:
        self._active = None


class _LiveOnly:
    """A dataset() batch less its tombstoned rows (``dead``: a part's path -> its shard's dead keys)."""

    def __init__(self, dead: dict[str, Any]):
        self.dead = dead

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        paths = batch.column("path").to_pylist()
        keys = batch.column("key").to_numpy().astype(np.uint64)
        keep = np.ones(len(keys), dtype=bool)
        for path in set(paths):
            dead = self.dead.get(path)
            if dead is None:
                dead = next((d for p, d in self.dead.items() if path.endswith(p) or p.endswith(path)), None)
            if dead is not None:
                rows = np.asarray([p == path for p in paths])
                keep &= ~(rows & np.isin(keys, dead))
        return batch.filter(pa.array(keep))
