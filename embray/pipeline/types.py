"""The contracts between the build stages: what each stage hands the next, as frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from embray.config import IndexConfig
from embray.lifecycle.versions import BuildKind, FileEntry, Manifest, ShardAction, ShardEntry
from embray.models.spec import ModelSpec
from embray.results import Counts
from embray.storage.segments import ShardFiles


@dataclass(frozen=True)
class BuildSpec:
    """What one build makes: its kind, model, and the version it derives from."""

    kind: BuildKind
    model: ModelSpec
    parent: Manifest | None = None  # lineage; its vectors are reused only when its fingerprint is the model's
    params: dict[str, Any] = field(default_factory=dict)  # extra MLflow params
    fingerprint: str | None = None  # known already (a dry run against a version): skips hashing the weights
    like: Manifest | None = None  # a backfill's: the active version, whose chunking an unset `chunk:` keeps


@dataclass(frozen=True)
class ParentShard:
    """What a build may take from its parent's shard: only ever from the same vector space."""

    version: str
    entry: ShardEntry
    files: ShardFiles  # its parts (base, then delta segments) and tombstones: read live rows through it
    index_rel: str | None  # the base's index
    index_cfg: IndexConfig  # the settings its graph was built with
    rejects_rel: str | None = None  # its rejects file
    meta: bool = False  # its parts keep metadata columns or texts (and each row's ``meta_hash``)


# A text's characters count towards a chunk's cost up to this many: models truncate (MiniLM reads ~1,300 of a
# long text's characters, 512-token models ~2,500), so a 300,000-character page costs what a long one does.
COST_CHARS = 2048

# A chunked version's rows are passages: besides id (``<doc>#<ordinal>#<start>``), key, content_hash and vector,
# its embeddings parts hold each passage's document id and span in the document's text.
SPAN_COLUMNS = ["doc", "ordinal", "start", "end"]


@dataclass(frozen=True)
class Chunk:
    """Texts still to embed (``need``, a staging file) and the cache file their vectors go to."""

    need: str
    cache: str
    rows: int
    chars: int  # the texts' characters, each counted up to COST_CHARS: what embedding the chunk costs, roughly


@dataclass(frozen=True)
class ShardPlan:
    """The plan stage's verdict on one shard: which rows are rejected, reused, or still to embed."""

    shard: int
    rows: int  # rows the shard will hold (a chunked version's: passages)
    rejected: int
    by_reason: dict[str, int]
    rejects: FileEntry | None  # the shard's rejects file (None in a dry run or without rejects)
    counts: Counts  # counts.embedded: distinct texts found in neither the parent nor the cache
    content_digest: str
    unchanged: bool  # same rows as the parent's shard: reuse its files by reference
    oldest_stale_us: int | None  # the earliest source change time (µs) of a new or changed row
    chunks: tuple[Chunk, ...] = ()
    compact: bool = False  # rebuild a shard with segments or tombstones whole, though its rows are unchanged
    documents: int = 0  # the documents its rows are passages of (chunked versions; else its rows)
    truncated: int | None = None  # unchunked: rows longer than the model's window (None: not counted)
    truncated_tokens: int | None = None  # their tokens past it, which the model never reads


@dataclass(frozen=True)
class ShardBuild:
    """A written (or reused) shard."""

    entry: ShardEntry
    action: ShardAction


@dataclass(frozen=True)
class Embedded:
    """What stage 3 (or one of its workers) did: texts embedded, the Ray node ids they were embedded on, how the
    workers ran the model (:class:`embray.models.base.Compute` as text), and the largest worker's peak RSS."""

    rows: int
    nodes: tuple[str, ...] = ()
    compute: tuple[str, ...] = ()
    peak_rss_mib: float | None = None

    def __add__(self, other: Embedded) -> Embedded:
        rss = [x for x in (self.peak_rss_mib, other.peak_rss_mib) if x is not None]
        return Embedded(
            self.rows + other.rows,
            tuple(sorted({*self.nodes, *other.nodes})),
            tuple(sorted({*self.compute, *other.compute})),
            max(rss) if rss else None,
        )
