"""Typed results of every operation: frozen dataclasses whose ``to_dict()`` is the CLI's ``--json`` output.

The JSON shapes are users' contracts (README, docs/monitoring.md): a field may be added, never renamed
or dropped. Optional parts of a report (``overlap_at_10`` without ``--against``...) are left out of
``to_dict()`` when they were not measured, as they always were.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from embray.lifecycle.versions import Manifest

COUNTS = ("new", "changed", "deleted", "reused", "embedded", "cache_hits")


class _Result:
    """``to_dict()`` for a dataclass: nested results become dicts, fields in ``_omit_none`` are left out
    when None, and fields in ``_hidden`` never appear (they are for Python callers only)."""

    _omit_none: tuple[str, ...] = ()
    _hidden: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self._hidden or (value is None and f.name in self._omit_none):
                continue
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """The result back from its ``to_dict()`` (e.g. a report another process wrote as JSON): nested results
        are rebuilt as their types; keys this version does not know are ignored, missing ones take defaults."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: _revive(hints[k], v) for k, v in data.items() if k in known})


def _revive(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _revive(next(a for a in args if a is not type(None)), value)
    if isinstance(tp, type) and issubclass(tp, _Result):
        return tp.from_dict(value)
    if origin is list:
        return [_revive(args[0], v) for v in value]
    if origin is dict:
        return {k: _revive(args[1], v) for k, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, _Result):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --- builds ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts(_Result):
    """What a build (or a dry run) found per row, summed over shards."""

    new: int = 0
    changed: int = 0
    deleted: int = 0
    reused: int = 0
    embedded: int = 0  # texts sent to the model (a dry run: texts it would send, see PlanResult.to_embed)
    cache_hits: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, k) + getattr(other, k) for k in COUNTS))


@dataclass(frozen=True)
class SourceFiles(_Result):
    """Source files a build read (new or changed since its parent) and reused unread (unchanged)."""

    read: int = 0
    reused: int = 0


@dataclass(frozen=True)
class BuildResult(_Result):
    """A committed version made by ``backfill``, ``refresh`` or ``migrate``."""

    version: str
    parent: str | None
    uri: str
    fingerprint: str
    rows: int
    rejected: int
    rejected_by_reason: dict[str, int]
    counts: Counts
    seconds: float
    model_version: str | None
    aliases: tuple[str, ...] = ()
    embed_nodes: tuple[str, ...] = ()  # Ray node ids the texts were embedded on (none when nothing was)
    embed_compute: tuple[str, ...] = ()  # how the workers ran the model (path, dtype, why), one per distinct way
    embed_worker_peak_rss_mib: float | None = None  # the largest embedding worker's peak resident memory
    source_files: SourceFiles = SourceFiles()
    manifest: Manifest | None = field(default=None, compare=False, repr=False)
    documents: int | None = None  # a chunked version's documents (its rows are their passages)
    truncation: Truncation | None = None  # an unchunked version's rows the model's window cut short

    @property
    def promoted(self) -> bool:
        return "active" in self.aliases

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "parent": self.parent,
            "uri": self.uri,
            "fingerprint": self.fingerprint,
            "rows": self.rows,
            "rejected": self.rejected,
            "rejected_by_reason": dict(self.rejected_by_reason),
            **self.counts.to_dict(),
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows / self.seconds, 1) if self.seconds else None,
            "model_version": self.model_version,
            "aliases": list(self.aliases),
            "embed_nodes": list(self.embed_nodes),
            "embed_compute": list(self.embed_compute),
            "embed_worker_peak_rss_mib": self.embed_worker_peak_rss_mib,
            "source_files": self.source_files.to_dict(),
            **_extras(self.documents, self.truncation),
        }


def _extras(documents: int | None, truncation: Truncation | None) -> dict[str, Any]:
    out: dict[str, Any] = {} if documents is None else {"documents": documents}
    return out if truncation is None else {**out, "truncated": truncation.to_dict()}


@dataclass(frozen=True)
class Truncation(_Result):
    """Rows longer than the model's window, in a version of one vector per row: the model read only each one's
    first ``window`` tokens (special tokens included) and never the other ``tokens``."""

    rows: int
    tokens: int
    window: int


@dataclass(frozen=True)
class Estimate(_Result):
    """What a planned build will cost (see :mod:`embray.quality.estimate`); ``basis`` says where the numbers come
    from."""

    to_embed: int
    shards_rebuilt: int
    shards_updated: int
    shards_reused: int
    seconds: float | None  # wall time; None without earlier builds of this model to go by
    texts_per_s: float | None
    cpu_hours: float | None  # embedding actors' reserved CPU-hours
    gpu_hours: float | None
    bytes_added: int | None  # store bytes of the new embeddings parts and index shards
    basis: str
    shards_delta: int = 0  # shards that get a delta segment and tombstones (index.max_delta_fraction)


@dataclass(frozen=True)
class PlanResult(_Result):
    """A dry-run refresh: what a refresh of ``parent`` would do now; nothing was written or embedded."""

    parent: str | None
    fingerprint: str
    rows: int
    rejected: int
    rejected_by_reason: dict[str, int]
    counts: Counts  # counts.embedded is 0: nothing was sent to the model
    to_embed: int  # texts a refresh would send to the model
    oldest_stale_us: int | None  # the source's earliest change time (µs since the epoch) not in the parent
    seconds: float
    estimate: Estimate | None = None  # asked for by `refresh --dry-run` and `migrate --dry-run`
    source_files: SourceFiles = SourceFiles()
    documents: int | None = None
    truncation: Truncation | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": None,
            "parent": self.parent,
            "uri": None,
            "fingerprint": self.fingerprint,
            "rows": self.rows,
            "rejected": self.rejected,
            "rejected_by_reason": dict(self.rejected_by_reason),
            **self.counts.to_dict(),
            "to_embed": self.to_embed,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows / self.seconds, 1) if self.seconds else None,
            "model_version": None,
            "aliases": [],
            "dry_run": True,
            "source_files": self.source_files.to_dict(),
            **({"estimate": self.estimate.to_dict()} if self.estimate else {}),
            **_extras(self.documents, self.truncation),
        }


# --- versions and search ------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionInfo(_Result):
    """One committed version, as ``embray versions`` lists it."""

    id: str
    model: str
    fingerprint: str
    rows: int
    rejected: int
    dims: int
    shards: int
    created: str
    parent: str | None
    aliases: list[str]
    registered: bool  # false only after a crash between commit and MLflow registration
    chunk: dict[str, int] | None = None  # {tokens, overlap} of a version of passages; None: one vector per row
    documents: int | None = None  # the documents a version of passages holds
    columns: dict[str, str] = field(default_factory=dict)  # metadata columns kept (name -> kind): filters, fields
    keywords: bool = False  # a BM25 keyword index (search modes keyword and hybrid)


@dataclass(frozen=True)
class ChunkRef(_Result):
    """Which passage of a document a hit is: its ordinal and its span, ``text[start:end]`` of the document."""

    ordinal: int
    start: int
    end: int


@dataclass(frozen=True)
class Hit(_Result):
    """One result: a row's id and score; in a chunked version, a document's id, scored by its best passage
    (``chunk``: that passage); ``fields``: the stored columns a search asked for."""

    id: Any
    score: float
    chunk: ChunkRef | None = None
    fields: dict[str, Any] | None = None  # the kept columns (and text) a search asked for, by name

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "score": round(self.score, 6)}
        if self.chunk is not None:
            out["chunk"] = self.chunk.to_dict()
        if self.fields is not None:
            out["fields"] = {k: _json_value(v) for k, v in self.fields.items()}
        return out


def _json_value(v: Any) -> Any:
    """A field's value as JSON holds it: timestamps and dates as ISO 8601 text."""
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


@dataclass(frozen=True)
class SearchResult(_Result):
    """Top-k hits of one query, best first, and the version (and vector space) they came from."""

    version: str
    fingerprint: str
    results: list[Hit]


# --- verify, gates, promotion, gc ----------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport(_Result):
    version: str
    ok: bool
    problems: list[str]


@dataclass(frozen=True)
class Gate(_Result):
    """One promotion gate's verdict; ``verify`` has no number, the quality gates do."""

    gate: str
    passed: bool
    detail: str
    value: float | None = None
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gate": self.gate, "passed": self.passed}
        if self.gate != "verify":
            out.update(value=self.value, threshold=self.threshold)
        out["detail"] = self.detail
        return out


@dataclass(frozen=True)
class GateReport(_Result):
    version: str
    passed: bool
    gates: list[Gate]
    eval: EvalReport | None = None  # None when verify failed (the other gates were not run)

    _omit_none = ("eval",)

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]


@dataclass(frozen=True)
class PromoteResult(_Result):
    active: str
    previous: str | None
    gates: list[Gate]
    forced: bool


@dataclass(frozen=True)
class RollbackResult(_Result):
    active: str
    previous: str | None


@dataclass(frozen=True)
class GcResult(_Result):
    kept: list[str]
    deleted: list[str]
    unfinished: list[str]  # builds that failed or were killed: no manifest, never visible
    caches: list[str]  # vector caches (fingerprints) no kept version uses
    scratch: list[str]  # dry runs (status) killed more than an hour ago
    dry_run: bool
    source_states: list[str] = field(default_factory=list)  # row-state files (sources/) no kept version records
    lease_files: int = 0  # claims and ends of retired lease generations deleted (0 in a dry run)


# --- quality ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalReport(_Result):
    version: str
    fingerprint: str
    rows: int
    recall_at_10: float  # ANN vs exact search of the same shards
    recall_queries: int
    against: str | None = None
    overlap_at_10: float | None = None
    overlap_queries: int | None = None
    ndcg_at_10: float | None = None
    labelled_recall_at_10: float | None = None
    labelled_queries: int | None = None
    queries_file: str | None = None
    seconds: float = 0.0

    _omit_none = (
        "against",
        "overlap_at_10",
        "overlap_queries",
        "ndcg_at_10",
        "labelled_recall_at_10",
        "labelled_queries",
        "queries_file",
    )

    def numbers(self) -> dict[str, float]:
        """The measured numbers, for MLflow metrics and tags."""
        return {k: v for k, v in self.to_dict().items() if isinstance(v, int | float) and not isinstance(v, bool)}


@dataclass(frozen=True)
class AuditReport(_Result):
    version: str
    fingerprint: str
    fingerprint_here: str
    sampled: int
    compared: int
    source_changed: int
    source_missing: int
    min_cosine: float | None
    mean_cosine: float | None
    threshold: float
    drifted: int
    worst: list[dict[str, Any]]
    ok: bool
    problems: list[str]
    seconds: float


# --- status and the monitor ---------------------------------------------------------------------


@dataclass(frozen=True)
class VersionSummary(_Result):
    id: str
    fingerprint: str
    model: str
    rows: int
    created: str
    age_s: float
    parent: str | None
    segments: int = 0  # delta segments over all its shards (``embray compact`` folds them into the bases)
    segmented_shards: int = 0  # shards with delta segments or tombstones
    dead_rows: int = 0  # tombstoned rows its bases and segments still hold (searched past, then dropped)
    documents: int | None = None  # chunked: the documents its rows are passages of
    truncated_rows: int | None = None  # unchunked: rows longer than the model's window (None: not counted)
    truncated_tokens: int | None = None  # their tokens the model never read


@dataclass(frozen=True)
class Staleness(_Result):
    """How far a version is behind the source now (see docs/monitoring.md)."""

    version: str
    new: int
    changed: int
    deleted: int
    unchanged: int
    stale: int
    fraction: float  # (new + changed + deleted) / (rows of the version + new)
    to_embed: int
    source_rows: int
    source_rejected: int
    oldest_stale_at: str | None
    oldest_stale_age_s: float | None


@dataclass(frozen=True)
class VersionCheck(_Result):
    """``embray verify`` of one aliased version, in a status report."""

    ok: bool
    problems: list[str] = field(default_factory=list)  # the first ten


@dataclass(frozen=True)
class SpaceUse(_Result):
    """One vector space (fingerprint) in a status report: its model and which alias holds which version."""

    model: str
    versions: dict[str, str] = field(default_factory=dict)  # alias -> version id


@dataclass(frozen=True)
class MonitorAction(_Result):
    refreshed: str | None = None
    promoted: str | None = None
    refused: str | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class ShadowStats(_Result):
    """The live comparison of one candidate with the active version, over every replica's shadow queries."""

    candidate: str
    queries: int
    overlap_at_10: float  # mean share of the active top-10 ids the candidate also returned
    p50_ms: float
    p99_ms: float
    replicas: int
    updated_at: str


@dataclass(frozen=True)
class StatusReport(_Result):
    """``embray status``: is the collection current, consistent and served as its alias says?

    A monitor check adds ``action`` (what it did); a check that failed has ``error`` and few other fields.
    """

    collection: str
    checked_at: str
    ok: bool
    problems: list[str]
    active: VersionSummary | None = None
    candidate: VersionSummary | None = None
    staleness: Staleness | None = None
    verify: dict[str, VersionCheck] = field(default_factory=dict)  # version -> its verify
    fingerprints: dict[str, SpaceUse] = field(default_factory=dict)  # fingerprint -> model, versions by alias
    consistent: bool | None = None
    served: str | None = None
    served_matches: bool | None = None
    seconds: float = 0.0
    action: MonitorAction | None = None
    error: str | None = None
    shadow: ShadowStats | None = None  # the candidate on live shadow traffic (serve.shadow), when it had any

    _omit_none = ("action", "error", "shadow")

    def metrics(self) -> dict[str, float]:
        """The numbers, flat, for MLflow and Prometheus."""
        m: dict[str, float] = {"ok": float(self.ok), "problems": float(len(self.problems))}
        if self.active:
            a = self.active
            m.update({"active.age_s": a.age_s, "active.rows": a.rows, "active.segments": a.segments})
            m["active.dead_rows"] = a.dead_rows
        s = self.staleness
        if s:
            m.update(
                {f"staleness.{k}": float(getattr(s, k)) for k in ("new", "changed", "deleted", "stale", "fraction")}
            )
            if s.oldest_stale_age_s is not None:
                m["staleness.oldest_stale_age_s"] = s.oldest_stale_age_s
        if self.consistent is not None:
            m["consistent"] = float(self.consistent)
        if self.served_matches is not None:
            m["served_matches"] = float(self.served_matches)
        return m
