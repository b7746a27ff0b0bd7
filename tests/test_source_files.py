"""Reading cost that follows the change: a build reads and hashes only the source files that changed
since its parent, and takes the rest's rows from the parent's row states (real local Ray, hash backend)."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embray import Collection
from embray.storage import source as source_module
from embray.storage.store import Store

from .helpers import assert_same_content, content, make_config, write_corpus

pytestmark = pytest.mark.usefixtures("ray_local")

HOUR_NS = 3600 * 10**9


def age(corpus, seconds: float = 3600) -> None:
    """Backdate every file's mtime: files written long before a build are trusted by size and mtime."""
    for f in corpus.glob("*.parquet"):
        t = time.time_ns() - int(seconds * 1e9)
        os.utime(f, ns=(t, t))


def rewrite(path, rows: dict) -> None:
    pq.write_table(pa.table({"id": list(rows), "text": list(rows.values())}), path)


def file_rows(path) -> dict:
    t = pq.read_table(path)
    return dict(zip(t.column("id").to_pylist(), t.column("text").to_pylist(), strict=True))


@pytest.fixture
def hashed(monkeypatch):
    """The source files whose bytes the driver hashed (to tell an unchanged file from a changed one)."""
    seen: list[str] = []
    real = source_module.sha256_of

    def spy(fh):
        seen.append(getattr(fh, "path", None) or getattr(fh, "name", ""))
        return real(fh)

    monkeypatch.setattr(source_module, "sha256_of", spy)
    return seen


def test_refresh_and_status_read_only_the_changed_file(tmp_path, hashed):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, files=4, rows=100)
    age(corpus)
    cfg = make_config(tmp_path)
    col = Collection(cfg)
    parent = col.backfill()
    assert parent.source_files.to_dict() == {"read": 4, "reused": 0}
    assert len(parent.manifest.inputs) == 4 and sum(i.rows for i in parent.manifest.inputs) == 400

    # One file of four changes: 3 rows updated, 2 deleted, 2 added.
    target = corpus / "part-00002.parquet"
    rows = file_rows(target)
    ids = sorted(rows)
    for i in ids[:3]:
        rows[i] = rows[i] + " revised"
    for i in ids[3:5]:
        del rows[i]
    rows.update({"doc-new-1": "a brand new river text", "doc-new-2": "another new mountain text"})
    rewrite(target, rows)
    hashed.clear()

    plan = col.refresh(dry_run=True)  # what `embray status` runs to measure staleness
    assert plan.source_files.to_dict() == {"read": 1, "reused": 3}
    assert plan.to_dict()["source_files"] == {"read": 1, "reused": 3}
    assert (plan.counts.new, plan.counts.changed, plan.counts.deleted) == (2, 3, 2)
    assert [os.path.basename(p) for p in hashed] == ["part-00002.parquet"]  # the others: size and mtime only

    child = col.refresh(promote=True)
    assert child.source_files.to_dict() == {"read": 1, "reused": 3}
    assert (child.counts.new, child.counts.changed, child.counts.deleted, child.counts.embedded) == (2, 3, 2, 5)
    m = child.manifest
    assert m.counts["files_read"] == 1 and m.counts["files_reused"] == 3
    kept = [i for i in m.inputs if i.path != "/part-00002.parquet"]
    assert [i.state for i in kept] == [i.state for i in parent.manifest.inputs if i.path != "/part-00002.parquet"]
    assert col.verify(child.version).ok

    # The same rows as a fresh backfill of the changed corpus.
    fresh_cfg = make_config(tmp_path, store={"uri": str(tmp_path / "fresh-store")})
    fresh = Collection(fresh_cfg).backfill()
    assert_same_content(content(cfg, child.version), content(fresh_cfg, fresh.version))
    assert m.source["digest"] == fresh.manifest.source["digest"]

    # Nothing changed since: nothing is read, not even hashed, and every shard is reused.
    hashed.clear()
    again = col.refresh(dry_run=True)
    assert again.source_files.to_dict() == {"read": 0, "reused": 4} and again.to_embed == 0
    assert again.counts.reused == again.rows == child.rows and again.rejected == child.rejected
    assert (again.counts.new, again.counts.changed, again.counts.deleted) == (0, 0, 0)
    assert hashed == [] or all(os.path.basename(p) == "part-00002.parquet" for p in hashed)  # just written: racy


def test_a_same_size_rewrite_within_one_mtime_tick_is_seen(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    target = corpus / "part-00000.parquet"
    rows = {f"doc-{i}": f"text number {i:03d} about rivers" for i in range(50)}
    pq.write_table(pa.table({"id": list(rows), "text": list(rows.values())}), target, compression="NONE")
    soon = time.time_ns() + 5 * 10**9  # within a tick of the build's check, however slow this machine is
    os.utime(target, ns=(soon, soon))
    col = Collection(make_config(tmp_path))
    col.backfill()

    st = target.stat()
    data = target.read_bytes()
    assert data.count(b"number 017 about") == 1
    target.write_bytes(data.replace(b"number 017 about", b"number 017 above"))  # same size, other content
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same mtime, as on a coarse-clock filesystem
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns

    child = col.refresh()
    assert child.counts.changed == 1 and child.counts.embedded == 1
    assert child.source_files.read == 1  # its mtime was too recent to trust: the digest decided


def test_a_touched_file_is_hashed_but_not_read(tmp_path, hashed):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, files=3, rows=40)
    age(corpus)
    col = Collection(make_config(tmp_path))
    col.backfill()
    hashed.clear()
    os.utime(corpus / "part-00001.parquet")  # `touch`: a new mtime, the same bytes
    child = col.refresh()
    assert child.source_files.to_dict() == {"read": 0, "reused": 3}
    assert child.counts.embedded == 0 and child.counts.reused == 120
    assert [os.path.basename(p) for p in hashed] == ["part-00001.parquet"]


def test_a_duplicate_resolved_elsewhere_embeds_the_unchanged_files_row(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rewrite(corpus / "a.parquet", {"x": "the alpha text about rivers", "a1": "one more row"})
    rewrite(corpus / "b.parquet", {"x": "the beta text about hills", "b1": "another row"})
    age(corpus)
    cfg = make_config(tmp_path)
    col = Collection(cfg)
    parent = col.backfill()
    assert parent.rejected_by_reason == {"duplicate id": 2}
    rejects = parent.manifest.shards
    texts = {
        t
        for s in rejects
        if s.rejects
        for t in pq.read_table(tmp_path / "store" / "docs" / "versions" / parent.version / s.rejects.path)
        .column("text")
        .to_pylist()
    }
    assert texts == {"the alpha text about rivers", "the beta text about hills"}  # kept with their text

    rewrite(corpus / "b.parquet", {"b1": "another row"})  # b no longer claims "x": a's row becomes good
    child = col.refresh()
    assert child.source_files.to_dict() == {"read": 1, "reused": 1}
    assert child.counts.new == 1 and child.counts.embedded == 1 and child.rejected == 0
    assert content(cfg, child.version)["x"][0] == content_hash("the alpha text about rivers")

    # b claims "x" again (both copies rejected), then a gives it up while b changes: b's copy is a text b
    # already held when the last version read it, so the scan did not set it aside; it is read from b.
    rewrite(corpus / "b.parquet", {"b1": "another row", "x": "the beta text about hills"})
    assert col.refresh().rejected_by_reason == {"duplicate id": 2}
    rewrite(corpus / "a.parquet", {"a1": "one more row"})
    rewrite(corpus / "b.parquet", {"b1": "another row, edited", "x": "the beta text about hills"})
    last = col.refresh()
    assert last.counts.embedded == 2 and last.rejected == 0 and col.verify(last.version).problems == []
    assert content(cfg, last.version)["x"][0] == content_hash("the beta text about hills")


def content_hash(text: str) -> str:
    from embray.storage.rows import content_hash as h

    return h(text)


def test_gc_deletes_the_row_states_no_kept_version_records(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, files=3, rows=30)
    age(corpus)
    cfg = make_config(tmp_path)
    col = Collection(cfg)
    parent = col.backfill(promote=True)
    target = corpus / "part-00000.parquet"
    rewrite(target, {i: t + " changed" for i, t in file_rows(target).items()})  # touches every shard
    child = col.refresh(promote=True)
    assert child.manifest.referenced_versions() == set()
    store = Store(cfg.store.uri)
    states = set(store.parquet_names("docs/sources"))
    assert len(states) == 4  # three of the backfill's, one new: the unchanged two are shared

    out = col.gc(keep=1)
    assert out.deleted == [parent.version]
    gone = {i.state.path for i in parent.manifest.inputs} - {i.state.path for i in child.manifest.inputs}
    assert out.source_states == sorted(gone) and len(gone) == 1
    assert set(store.parquet_names("docs/sources")) == states - gone
    assert col.verify(child.version).ok
    assert col.refresh(dry_run=True).source_files.to_dict() == {"read": 0, "reused": 3}


def test_a_changed_column_setting_reads_every_file_again(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, files=2, rows=20)
    age(corpus)
    Collection(make_config(tmp_path)).backfill()
    other = make_config(tmp_path, source={"uri": str(corpus), "updated_at_column": "modified"})
    assert Collection(other).refresh(dry_run=True).source_files.to_dict() == {"read": 2, "reused": 0}
