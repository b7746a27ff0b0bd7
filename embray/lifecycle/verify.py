"""Verify a committed version: is every file there and intact, in one vector space, consistent with its manifest?"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embray.errors import VersionError
from embray.lifecycle.versions import FileEntry, Manifest, ShardEntry, file_rel, read_manifest
from embray.results import VerifyReport
from embray.storage import rows as R
from embray.storage.store import Store, local_tmpdir, sha256_of
from embray.storage.vectors import file_fingerprint


def _file_problems(store: Store, m: Manifest) -> list[str]:
    problems: list[str] = []
    fps = {s.fingerprint for s in m.shards}
    if fps - {m.fingerprint}:
        problems.append(f"mixed fingerprints: manifest {m.fingerprint}, shards {sorted(fps - {m.fingerprint})}")
    if len(m.shards) != m.index.shards:
        problems.append(f"manifest lists {len(m.shards)} shards, its index config says {m.index.shards}")
    for rel, f in [(file_rel(m, f), f) for f in m.files()] + list(m.state_files().items()):
        try:
            with store.fs.open(store.path(rel), "rb") as fh:
                sha, size = sha256_of(fh)
        except FileNotFoundError:
            problems.append(f"missing file {store.url(rel)}")
            continue
        if (sha, size) != (f.sha256, f.bytes):
            problems.append(
                f"checksum mismatch {store.url(rel)}: {size} bytes sha256 {sha[:16]}..., "
                f"manifest says {f.bytes} bytes sha256 {f.sha256[:16]}..."
            )
    return problems


def _shard_problems(store: Store, m: Manifest, s: ShardEntry, seen: set[Any], tmp: Path) -> tuple[list[str], int]:
    """One shard: each part's fingerprint and index, then its live rows (base + segments - tombstones) against
    the entry: count, unique and well-placed ids, digest. Returns (problems, live rows)."""
    import numpy as np
    import pyarrow as pa

    problems, tables = [], []
    for emb, idx, rows in s.parts:
        part = store.read_table(file_rel(m, emb))
        part_fp = file_fingerprint(part.schema)
        if part_fp != m.fingerprint:
            problems.append(
                f"shard {s.shard}: embeddings part has fingerprint {part_fp!r} ({emb.path}), "
                f"the version {m.fingerprint}"
            )
        if part.num_rows != rows:
            problems.append(f"shard {s.shard}: {emb.path} has {part.num_rows} rows, manifest {rows}")
        problems += _index_problems(store, m, s, idx, rows, part, tmp)
        tables.append(part.select(["id", "key", "content_hash", *(["doc"] if m.chunk else [])]))
    table = pa.concat_tables(tables)
    keys = table.column("key").to_numpy().astype(np.uint64)
    if len(np.unique(keys)) != len(keys):
        problems.append(f"shard {s.shard}: a key is in two of its parts")
    if s.tombstones is not None:
        dead = store.read_table(file_rel(m, s.tombstones), ["key"]).column("key").to_numpy().astype(np.uint64)
        if len(dead) != s.dead or not np.isin(dead, keys).all():
            problems.append(
                f"shard {s.shard}: its tombstones ({len(dead)}, manifest {s.dead}) name keys it does not hold"
            )
        table = table.filter(pa.array(~np.isin(keys, dead)))
    ids = table.column("id").to_pylist()
    if len(ids) != s.rows:
        problems.append(f"shard {s.shard}: holds {len(ids)} live rows, manifest {s.rows}")
    dup = len(ids) - len(set(ids))
    if dup:
        problems.append(f"shard {s.shard}: {dup} duplicate ids")
    across = seen.intersection(ids)
    if across:
        problems.append(f"shard {s.shard}: {len(across)} ids also in another shard, e.g. {next(iter(across))!r}")
    seen.update(ids)
    placed = table.column("doc").to_pylist() if m.chunk else ids  # a passage is in its document's shard
    misplaced = sum(1 for i in placed if R.shard_of(i, len(m.shards)) != s.shard)
    if misplaced:
        problems.append(f"shard {s.shard}: {misplaced} {'passages' if m.chunk else 'ids'} belong to another shard")
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    hashes = table.column("content_hash").to_pylist()
    if R.digest_pairs([ids[i] for i in order], [hashes[i] for i in order]) != s.content_digest:
        problems.append(f"shard {s.shard}: content digest does not match the manifest")
    return problems, len(ids)


def _index_problems(store: Store, m: Manifest, s: ShardEntry, f: FileEntry, rows: int, part, tmp: Path) -> list[str]:
    import numpy as np
    from usearch.index import Index

    local = tmp / "index.usearch"
    if store.remote:
        store.download(file_rel(m, f), local, sha256=f.sha256, size=f.bytes)
    try:
        index = Index.restore(str(local if store.remote else store.path(file_rel(m, f))), view=True)
        if index is None:
            return [f"shard {s.shard}: {f.path} is not a USearch index"]
        if len(index) != rows or index.ndim != m.dims:
            return [
                f"shard {s.shard}: {f.path} holds {len(index)} vectors of {index.ndim} dims, "
                f"manifest {rows} of {m.dims}"
            ]
        if rows and not np.all(index.contains(part.column("key").to_numpy())):
            return [f"shard {s.shard}: {f.path} and its embeddings part disagree on keys"]
        return []
    finally:
        local.unlink(missing_ok=True)


def problems(store: Store, collection: str, version: str) -> list[str]:
    """Every problem found with a committed version; an empty list means it is sound.

    Checks: the manifest parses; every file (source row states, delta segments and tombstones included) is
    present with its recorded size and sha256; every embeddings part and index carries the manifest's
    fingerprint and size; a shard's live rows (base + segments - tombstones) match its entry: count, ids
    unique and in the shard their hash assigns, no key in two parts, content digest.
    """
    try:
        m = read_manifest(store, collection, version)
    except VersionError as e:
        return [str(e)]
    found = _file_problems(store, m)
    if found:
        return found  # the rest reads those files
    seen: set[Any] = set()
    total = 0
    tmp = local_tmpdir("embray-verify-")
    try:
        for s in m.shards:
            if s.embeddings is None or s.index is None:
                found.append(f"shard {s.shard} has no {'embeddings' if s.embeddings is None else 'index'} file")
                continue
            got, rows = _shard_problems(store, m, s, seen, tmp)
            found += got
            total += rows
    finally:
        tmp.rmdir()
    return found + count_problems(m, total)


def count_problems(m: Manifest, live: int) -> list[str]:
    """The manifest's counts against the ``live`` rows its parts hold and the rows its source files held; a
    count an older manifest did not record is not checked."""
    found = []
    if (m.counts.rows is not None and live != m.counts.rows) or live != m.rows:
        found.append(f"parts hold {live} rows, manifest says {m.counts.rows if m.counts.rows is not None else m.rows}")
    read = sum(i.rows for i in m.inputs)
    if m.inputs and m.counts.input_rows is not None and read != m.counts.input_rows:
        found.append(f"source files held {read} rows, manifest says {m.counts.input_rows} were read")
    return found


def verify(store: Store, collection: str, version: str) -> VerifyReport:
    """:func:`problems` as a report."""
    found = problems(store, collection, version)
    return VerifyReport(version=version, ok=not found, problems=found)
