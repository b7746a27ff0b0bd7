"""Versions: immutable, complete builds of a collection in one vector space.

Layout under the store root::

    <collection>/versions/<version>/
        embeddings/shard-00000.parquet   id, key, content_hash, vector (float32), in key order
        shards/shard-00000.usearch       USearch index over the same keys
        rejects/shard-00000.parquet      rows left out, with their reason (only when there are some)
        manifest.json                    written last, create-only: the version exists once it does

A directory without ``manifest.json`` is an unfinished or failed build and is
never listed, searched or registered.

Per source file, a version records what it read (:class:`SourceFile`) in a row-state file under
``<collection>/sources/``, named by its content and shared by every version that saw the file unchanged;
``gc`` deletes the ones no kept version records.

A refreshed version reuses the files of unchanged shards by reference: their
``FileEntry.version`` names the version directory that holds them, and ``gc``
never deletes a version that a kept version references.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import re
import secrets
import socket
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from embray.config import IndexConfig, SourceConfig
from embray.errors import VersionError
from embray.models.spec import ModelSpec
from embray.storage.layout import manifest_rel, sources_dir, version_dir, versions_dir
from embray.storage.store import Store

FORMAT = "embray.version/1"


class _Text(str, Enum):
    """A string-valued enum that prints, formats and serialises as its value (``f"{kind}"`` is ``refresh``)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


class BuildKind(_Text):
    """How a version was made (``counts.kind`` of its manifest, MLflow tag ``embray.kind``)."""

    BACKFILL = "backfill"  # a full build from the corpus
    REFRESH = "refresh"  # a child: only what changed since its parent embedded
    MIGRATE = "migrate"  # a full re-embed under another model (a new vector space)
    COMPACT = "compact"  # a child with its parent's rows, delta segments folded into whole shards


class ShardAction(_Text):
    """What a build did with one shard, next to its parent's."""

    REUSED = "reused"  # the parent's files, by reference
    DELTA = "delta"  # the parent's base and segments, plus a new delta segment and tombstones
    UPDATED = "updated"  # the parent's index copied and updated in place (few changes)
    REBUILT = "rebuilt"  # embeddings part and index written anew


class _Subscript:
    """``section["key"]`` reads a field, as the dicts the manifest's sections once were did."""

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None


class _Section(_Subscript, BaseModel):
    """A section of the manifest. Keys that older manifests wrote and this code no longer knows are kept
    (``extra="allow"``), so every committed manifest keeps loading."""

    model_config = ConfigDict(extra="allow", frozen=True)


class IndexMeta(_Subscript, IndexConfig):
    """The ``index`` section: the index settings the version was built with (``index:`` of the config)."""


class SourceMeta(_Section):
    """The ``source`` section: which corpus and columns a version was built from, and its digest."""

    uri: str
    id_column: str = "id"
    text_column: str = "text"
    files: int = 0
    digest: str = ""  # sha256 over the corpus's (id, content_hash) pairs, as the build saw them
    id_type: str = ""  # the id column's Arrow type ("" where unknown)
    updated_at_column: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)  # metadata columns kept: name -> kind
    store_text: bool = False  # each row's text is kept in the embeddings parts

    def reads_like(self, cfg: SourceConfig) -> bool:
        """Whether ``cfg`` names the same corpus and columns (a manifest older than ``updated_at_column``
        never does: its row states lack that column)."""
        then = (self.uri, self.id_column, self.text_column)
        if then != (cfg.uri, cfg.id_column, cfg.text_column) or "updated_at_column" not in self.model_fields_set:
            return False
        return self.updated_at_column == cfg.updated_at_column and set(self.columns) == set(cfg.columns)


class ChunkMeta(_Section):
    """The ``chunk`` section: how documents were cut into passages (absent: one vector per row, truncated at the
    model's window). Part of the vector space: two versions with different chunking never share vectors."""

    tokens: int  # per passage, special tokens and document prefix included
    overlap: int
    specials: int  # tokens the model adds to every input (special tokens, document prefix)
    cutter: str  # the cutting algorithm's name and version
    tokenizer: str  # sha256 of the tokenizer that counted the tokens

    def params(self) -> dict[str, Any]:
        """As MLflow params."""
        return {f"chunk.{k}": v for k, v in self.model_dump().items()}

    def same_as(self, other: ChunkMeta | None) -> bool:
        return other is not None and self.model_dump() == other.model_dump()


def same_chunking(a: ChunkMeta | None, b: ChunkMeta | None) -> bool:
    """Whether two versions cut documents the same way (both unchunked counts as the same)."""
    return a is None and b is None or a is not None and a.same_as(b)


# Counts only some versions have: left out of the manifest's JSON where None, as older manifests have them.
NEWER_COUNTS = ("documents", "truncated", "truncated_tokens")


class VersionCounts(_Section):
    """The ``counts`` section: rows read, kept and rejected, what the build embedded and reused, per shard."""

    kind: BuildKind | None = None  # None: a manifest older than build kinds
    input_rows: int | None = None  # None: not recorded (older manifests)
    rows: int | None = None  # vectors: passages of a chunked version
    documents: int | None = None  # the documents those passages come from (chunked versions only)
    truncated: int | None = None  # rows longer than the model's window (unchunked versions whose tokens were counted)
    truncated_tokens: int | None = None  # the tokens of theirs the model never read
    rejected: int = 0
    by_reason: dict[str, int] = Field(default_factory=dict)
    new: int = 0
    changed: int = 0
    deleted: int = 0
    reused: int = 0
    embedded: int = 0
    cache_hits: int = 0
    shards_reused: int = 0
    shards_updated: int = 0
    shards_delta: int = 0
    files_read: int = 0
    files_reused: int = 0


class BuildStats(_Section):
    """The ``stats`` section: wall seconds of the build and of its stages."""

    seconds: float = 0.0
    plan_seconds: float = 0.0
    embed_seconds: float = 0.0
    shard_seconds: float = 0.0


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str  # relative to the version directory that holds it
    sha256: str
    bytes: int
    version: str | None = None  # the version directory holding the file; None: this version's own


class Segment(BaseModel):
    """A delta segment of a shard: the rows a refresh added or changed, with an index of their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rows: int  # rows written (some may be tombstoned by a later refresh)
    embeddings: FileEntry
    index: FileEntry
    keywords: FileEntry | None = None  # its BM25 index (index.keywords)


class ShardEntry(BaseModel):
    """One shard of a version: a base (embeddings part and index), and after delta refreshes its segments
    and tombstones (the keys of base or segment rows that were changed or deleted since). Its rows are
    base + segments - tombstones, each id once."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    shard: int
    rows: int  # live rows
    rejected: int
    fingerprint: str
    content_digest: str  # sha256 over the shard's (id, content_hash) pairs in id order
    next_key: int = 0  # the next unused USearch key of this shard (keys are never reused)
    embeddings: FileEntry | None
    index: FileEntry | None
    rejects: FileEntry | None
    base_rows: int | None = None  # rows in the base files when there are segments or tombstones (else = rows)
    segments: list[Segment] = Field(default_factory=list)  # oldest first
    tombstones: FileEntry | None = None  # Parquet, one column `key` (uint64, sorted): dead keys of base and segments
    dead: int = 0  # keys in the tombstones file
    keywords: FileEntry | None = None  # the base's BM25 index over the same keys (index.keywords)

    @property
    def keyword_files(self) -> list[FileEntry | None]:
        """The BM25 index of the base and then of each segment (None where there is none), as :attr:`parts`."""
        return [self.keywords] + [g.keywords for g in self.segments] if self.parts else []

    @property
    def parts(self) -> list[tuple[FileEntry, FileEntry, int]]:
        """(embeddings, index, rows written) of the base and then each segment."""
        if self.embeddings is None or self.index is None:
            return []
        base = self.rows if self.base_rows is None else self.base_rows
        return [(self.embeddings, self.index, base)] + [(g.embeddings, g.index, g.rows) for g in self.segments]


class SourceFile(BaseModel):
    """What a build saw of one source file, so that the next build reads it again only when it changed.

    A file is unchanged when its size and ETag are the same (S3), or its size and mtime are the same and
    that mtime is more than a clock tick older than when it was last checked (local disk; otherwise its
    sha256 decides: a same-size rewrite within one mtime tick keeps the mtime, so a recent mtime is
    never trusted alone).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str  # relative to source.uri, as the source digest spells it
    bytes: int
    etag: str | None = None  # the store's content tag (S3 ETag), where it gives one
    sha256: str | None = None  # the file's content digest, where the store gives no ETag
    mtime_ns: int | None = None
    checked_ns: int  # wall clock when its size, mtime or digest were taken
    rows: int
    state: FileEntry  # in <collection>/sources/: id, row, content_hash, reason, updated_at, shard (text: rejects only)


class Manifest(BaseModel):
    """The committed record of a version. Written once, never changed."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: str = FORMAT
    collection: str
    version: str
    parent: str | None = None
    created: str
    created_by: str
    model: ModelSpec
    fingerprint: str
    dims: int
    index: IndexMeta
    chunk: ChunkMeta | None = None  # None: one vector per row (every version before chunking existed)
    source: SourceMeta
    counts: VersionCounts
    shards: list[ShardEntry]
    content_digest: str
    stats: BuildStats
    mlflow_run_id: str | None = None
    inputs: list[SourceFile] = Field(default_factory=list)  # per source file, in source order (none in older versions)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def files(self) -> list[FileEntry]:
        """The shards' files (the source row states are in :meth:`state_files`)."""
        out = []
        for s in self.shards:
            segs = [f for g in s.segments for f in (g.embeddings, g.index, g.keywords)]
            out += [f for f in (s.embeddings, s.index, s.rejects, s.tombstones, s.keywords, *segs) if f is not None]
        return out

    def state_files(self) -> dict[str, FileEntry]:
        """Store-relative path -> entry of each source file's row state."""
        return {f"{sources_dir(self.collection)}/{i.state.path}": i.state for i in self.inputs}

    def referenced_versions(self) -> set[str]:
        """Other versions whose files this one reuses."""
        return {f.version for f in self.files() if f.version and f.version != self.version}

    def to_json(self) -> bytes:
        doc = self.model_dump(mode="json")
        if doc["chunk"] is None:  # an unchunked version's manifest reads as every manifest before chunking did
            del doc["chunk"]
        for key, default in (("columns", {}), ("store_text", False)):  # (and one without metadata, likewise)
            if doc["source"].get(key) == default:
                del doc["source"][key]
        if doc["index"].get("keywords") is False:  # (without a keyword index, likewise)
            del doc["index"]["keywords"]
        for s in doc["shards"]:
            for entry in [s, *s.get("segments", [])]:
                if entry.get("keywords", 0) is None:
                    del entry["keywords"]
        for key in NEWER_COUNTS:
            if key in doc["counts"] and doc["counts"][key] is None:
                del doc["counts"][key]
        return json.dumps(doc, indent=2, sort_keys=True).encode()


_VERSION_ID = re.compile(r"^v\d{8}T\d{9}Z-[0-9a-f]{6}$")


def is_version_id(name: str) -> bool:
    """True for names shaped like the ids :func:`new_version_id` makes (so not an alias)."""
    return bool(_VERSION_ID.match(name))


def new_version_id(now: dt.datetime | None = None) -> str:
    """Sortable by creation time (to the millisecond), unique across machines: ``v20261125T194500123Z-3f9a1c``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"v{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}"


def file_rel(manifest: Manifest, entry: FileEntry) -> str:
    """Store-relative path of one of a version's files (its own, or one reused from an earlier version)."""
    return f"{version_dir(manifest.collection, entry.version or manifest.version)}/{entry.path}"


def read_manifest(store: Store, collection: str, version: str) -> Manifest:
    rel = manifest_rel(collection, version)
    try:
        raw = store.read_bytes(rel)
    except FileNotFoundError as e:
        raise VersionError(
            f"version {version} of collection {collection!r} does not exist or was never committed "
            f"(no {store.url(rel)}); `embray versions` lists the committed ones"
        ) from e
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as e:
        raise VersionError(f"manifest {store.url(rel)} is malformed: {e.errors()[0]['msg']}") from e


def list_versions(store: Store, collection: str) -> list[Manifest]:
    """Committed versions of ``collection``, oldest first."""
    found = [read_manifest(store, collection, name) for name in list_version_dirs(store, collection)[0]]
    return sorted(found, key=lambda m: (m.created, m.version))


def list_version_dirs(store: Store, collection: str) -> tuple[list[str], list[str]]:
    """(committed, uncommitted) version directory names: the latter are builds in progress, failed or killed."""
    committed, uncommitted = [], []
    for name in store.listdir(versions_dir(collection)):
        if store.exists(manifest_rel(collection, name)):
            committed.append(name)
        else:
            uncommitted.append(name)
    return committed, uncommitted


def commit_manifest(store: Store, manifest: Manifest) -> str:
    """Make the version visible: the manifest is the last write, and create-only."""
    store.create_exclusive(manifest_rel(manifest.collection, manifest.version), manifest.to_json())
    return store.url(version_dir(manifest.collection, manifest.version))
