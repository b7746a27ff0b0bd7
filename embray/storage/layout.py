"""Where everything lives: every store path, file name and Parquet metadata key, spelled out once.

Under the store root (local directory or ``s3://bucket/prefix``)::

    <collection>/versions/<version>/manifest.json                  written last, create-only
    <collection>/versions/<version>/embeddings/shard-00000.parquet id, key, content_hash, vector
    <collection>/versions/<version>/shards/shard-00000.usearch     USearch HNSW index
    <collection>/versions/<version>/embeddings/shard-00000-seg001.parquet, shards/shard-00000-seg001.usearch
                                                                   a delta segment (rows a refresh added or changed)
    <collection>/versions/<version>/tombstones/shard-00000.parquet key: the shard's dead keys (base and segments)
    <collection>/versions/<version>/rejects/shard-00000.parquet    id, text, path, reason
    <collection>/versions/<version>/_staging/{scan,plan,need}/...  a build's work files, deleted on commit
    <collection>/cache/<fingerprint>/shard-00000-of-00004/<digest>.parquet   content_hash, vector
    <collection>/sources/<digest>.parquet                          a source file's row states: id, content_hash...
    <collection>/_scratch/<id>/...                                 dry runs (status); never a version
    <collection>/_locks/{writer,aliases}/g<N>.{json,end}           lease generations (see embray.lifecycle.lock)
    <collection>/_locks/{writer,aliases}.json                      a copy of the newest claim
    <collection>/_status/status.json                               the monitor's last status
    <collection>/_status/reload.json                               a Serve reload marker
    <collection>/_status/shadow/<version>/<replica>.json           shadow traffic to a candidate, per replica
    <collection>/_status/groups/G<G>/<g>/<replica>.json            what a shard-group replica has loaded

On each machine, ``$EMBRAY_CACHE`` (default ``~/.cache/embray``) holds verified local copies of S3
version files and the ONNX exports of models.
"""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "manifest.json"
STAGING = "_staging"
SCRATCH = "_scratch"

# Parquet schema metadata of every embeddings part and cache file.
FINGERPRINT_KEY = b"embray.fingerprint"
SHARD_KEY = b"embray.shard"


def versions_dir(collection: str) -> str:
    return f"{collection}/versions"


def version_dir(collection: str, version: str) -> str:
    return f"{collection}/versions/{version}"


def manifest_rel(collection: str, version: str) -> str:
    return f"{version_dir(collection, version)}/{MANIFEST}"


def scratch_root(collection: str) -> str:
    return f"{collection}/{SCRATCH}"


def scratch_dir(collection: str, name: str) -> str:
    return f"{collection}/{SCRATCH}/{name}"


def staging_dir(vdir: str) -> str:
    """A build's work files inside its (uncommitted) version or scratch directory."""
    return f"{vdir}/{STAGING}"


def scan_dir(staged: str, shard: int) -> str:
    return f"{staged}/scan/shard-{shard:05d}"


def scan_file(staged: str, shard: int, file_index: int) -> str:
    return f"{scan_dir(staged, shard)}/f{file_index:06d}.parquet"


def plan_file(staged: str, shard: int) -> str:
    return f"{staged}/plan/shard-{shard:05d}.parquet"


def need_file(staged: str, shard: int, digest: str) -> str:
    return f"{staged}/need/shard-{shard:05d}/{digest}.parquet"


def sources_dir(collection: str) -> str:
    """Row states of source files, named by their sha256, shared by the versions that read a file unchanged."""
    return f"{collection}/sources"


def source_state_name(sha256: str) -> str:
    """Relative to a sources directory."""
    return f"{sha256[:32]}.parquet"


def embeddings_name(shard: int, segment: str = "") -> str:
    """Relative to the version directory (``segment``: e.g. "-seg002" for a shard's second delta segment)."""
    return f"embeddings/shard-{shard:05d}{segment}.parquet"


def index_name(shard: int, segment: str = "") -> str:
    return f"shards/shard-{shard:05d}{segment}.usearch"


def keywords_name(shard: int, segment: str = "") -> str:
    """A part's BM25 keyword index (index.keywords), beside its USearch index."""
    return f"shards/shard-{shard:05d}{segment}.bm25"


def tombstones_name(shard: int) -> str:
    return f"tombstones/shard-{shard:05d}.parquet"


def rejects_name(shard: int) -> str:
    return f"rejects/shard-{shard:05d}.parquet"


def caches_dir(collection: str) -> str:
    """One directory per fingerprint below it."""
    return f"{collection}/cache"


def cache_dir(collection: str, fp: str, shard: int, shards: int) -> str:
    return f"{collection}/cache/{fp}/shard-{shard:05d}-of-{shards:05d}"


def lock_file(collection: str, name: str) -> str:
    return f"{collection}/_locks/{name}.json"


def status_file(collection: str) -> str:
    return f"{collection}/_status/status.json"


def shadow_dir(collection: str, version: str) -> str:
    """Each Serve replica's shadow-traffic numbers for candidate ``version`` (see embray.quality.shadow)."""
    return f"{collection}/_status/shadow/{version}"


def group_status_dir(collection: str, groups: int, group: int) -> str:
    """Per-replica files of Serve shard group ``group`` of ``groups``: the versions each has loaded and warm."""
    return f"{collection}/_status/groups/G{groups}/{group}"


def reload_file(collection: str) -> str:
    return f"{collection}/_status/reload.json"


def local_cache_root() -> Path:
    """This machine's cache: verified copies of S3 version files, ONNX exports (``$EMBRAY_CACHE``)."""
    return Path(os.environ.get("EMBRAY_CACHE", Path.home() / ".cache" / "embray"))
