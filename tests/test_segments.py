"""Delta segments and tombstones: a small refresh writes only what changed, and everything reads the result
as the rows it stands for (search, dataset, verify, eval, audit, gc), on local disk and moto S3."""

from __future__ import annotations

import pytest

from embray import Collection
from embray.lifecycle.versions import file_rel, read_manifest
from embray.storage.rows import content_hash
from embray.storage.store import Store

from .helpers import assert_same_content, content, make_config, mutate, write_corpus, write_rows

pytestmark = pytest.mark.usefixtures("ray_local")


def _own_bytes(m) -> tuple[int, int]:
    """(bytes of the files this version wrote, bytes of every file it lists) of a manifest."""
    files = m.files()
    return sum(f.bytes for f in files if f.version in (None, m.version)), sum(f.bytes for f in files)


def test_a_small_refresh_writes_a_segment_and_tombstones_that_everything_reads(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=2, rows=500)
    cfg = make_config(tmp_path)
    col = Collection(cfg)
    v1 = col.backfill()
    changed, inserted, updated, deleted = mutate(rows, n_insert=20, n_update=20, n_delete=10)
    write_rows(tmp_path / "corpus", changed)
    v2 = col.refresh()
    m = v2.manifest
    assert m.counts["shards_delta"] == 3 and v2.counts.embedded == 40
    assert all(s.embeddings.version == v1.version and len(s.segments) == 1 for s in m.shards)
    assert sum(s.dead for s in m.shards) == 30 and m.rows == 1010
    own, total = _own_bytes(m)
    assert own < 0.1 * total, (own, total)  # the segments and tombstones only; the bases are the parent's
    assert col.verify(v2.version).problems == []

    # The same rows as a fresh backfill of the changed corpus: ids, content hashes, vectors.
    fresh_cfg = make_config(tmp_path, store={"uri": str(tmp_path / "fresh-store")})
    fresh = Collection(fresh_cfg).backfill()
    assert_same_content(content(cfg, v2.version), content(fresh_cfg, fresh.version))

    # Search: a new row is found by its text; a deleted row, or the old text of an updated one, never answers.
    vi = col.index(v2.version)
    new_id = sorted(inserted)[0]
    assert vi.search_text([changed[new_id]], k=1)[0][0].id == new_id
    for gone in sorted(deleted)[:5]:
        assert gone not in {h.id for h in vi.search_text([rows[gone]], k=30)[0]}
    exact = vi.search_vectors(vi.embedder.embed_queries([rows[sorted(deleted)[0]]]), 50, exact=True)[0]
    assert not {h.id for h in exact} & deleted
    fresh_vi = Collection(fresh_cfg).index(fresh.version)
    q = vi.embedder.embed_queries([changed[i] for i in sorted(updated)[:10]])
    assert [[h.id for h in r] for r in vi.search_vectors(q, 10, exact=True)] == [
        [h.id for h in r] for r in fresh_vi.search_vectors(q, 10, exact=True)
    ]
    assert col.eval(v2.version).recall_at_10 >= cfg.monitor.recall_floor

    # dataset(): each row once, with its newest content.
    df = col.dataset(v2.version).to_pandas()
    assert len(df) == len(changed) and set(df["id"]) == set(changed)
    assert all(h == content_hash(changed[i]) for i, h in zip(df["id"], df["content_hash"], strict=True))
    audit = col.audit(v2.version, sample=50)
    assert audit.drifted == 0 and audit.compared > 0

    # A damaged tombstones file is caught by verify.
    store = Store(cfg.store.uri)
    s0 = read_manifest(store, "docs", v2.version).shards[0]
    path = store.path(file_rel(m, s0.tombstones))
    with open(path, "ab") as fh:
        fh.write(b"x")
    assert any("checksum mismatch" in p and "tombstones" in p for p in col.verify(v2.version).problems)


def test_a_refresh_chain_compacts_past_its_limits_and_gc_keeps_the_bases_it_references(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=1, rows=600)
    cfg = make_config(tmp_path, index={"shards": 2, "max_segments": 2, "max_delta_fraction": 0.2})
    col = Collection(cfg)
    versions = [col.backfill(promote=True).version]
    actions = []
    for step in range(3):
        rows = mutate(rows, n_insert=6, n_update=6, n_delete=3)[0]
        rows = {(f"s{step}-{i}" if i.startswith("new-") else i): t for i, t in rows.items()}  # fresh new ids
        write_rows(tmp_path / "corpus", rows, files=1)
        child = col.refresh(promote=True)
        versions.append(child.version)
        actions.append((child.manifest.counts["shards_delta"], [len(s.segments) for s in child.manifest.shards]))
    # Two delta refreshes, then past max_segments the third compacts: whole shards again, nothing re-embedded.
    assert actions == [(2, [1, 1]), (2, [2, 2]), (0, [0, 0])]
    last = read_manifest(Store(cfg.store.uri), "docs", versions[-1])
    assert all(s.tombstones is None and s.embeddings.version is None for s in last.shards)
    fresh_cfg = make_config(tmp_path, index={"shards": 2}, store={"uri": str(tmp_path / "fresh-store")})
    fresh = Collection(fresh_cfg).backfill()
    assert_same_content(content(cfg, versions[-1]), content(fresh_cfg, fresh.version))

    # gc keeping the last two: version 3 (two segments on version 1's base) keeps the bases it points at.
    out = col.gc(keep=2)
    assert set(out.kept) >= {versions[1], versions[2], versions[3]} and versions[0] in out.kept
    for v in versions[2:]:
        assert col.verify(v).problems == [], v
    assert col.search(text=rows[sorted(rows)[0]], k=1, version=versions[2]).results[0].id == sorted(rows)[0]

    # A refresh under another index.metric, corpus unchanged: no shard keeps a graph of the old metric
    # (l2sq scores a row's own text 0, cos 1), nothing is re-embedded.
    l2 = Collection(make_config(tmp_path, index={"shards": 2, "max_segments": 2, "metric": "l2sq"}))
    child = l2.refresh(parent=versions[-1])
    assert child.manifest.counts["shards_reused"] == 0 and child.counts.embedded == 0
    assert child.manifest.index["metric"] == "l2sq" and l2.verify(child.version).problems == []
    vi = l2.index(child.version)
    for i in sorted(rows)[:6]:
        hit = vi.search_text([rows[i]], k=1)[0][0]
        assert hit.id == i and abs(hit.score) < 1e-3, (i, hit)


def _config_file(tmp_path) -> str:
    """The YAML of ``make_config(tmp_path)``, for the command line."""
    path = tmp_path / "embray.yaml"
    path.write_text(
        "collection: docs\nsource: {uri: ./corpus}\nstore: {uri: ./store}\n"
        "model: {backend: hash, name: words, dims: 64}\nindex: {metric: cos, dtype: f16, shards: 3}\n"
        "embed: {batch_size: 128, actors: 1, num_cpus: 1}\n"
    )
    return str(path)


def test_compact_rebuilds_segmented_shards_from_the_version_alone(tmp_path, capsys):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from embray.cli import main
    from embray.errors import VersionError

    rows = write_corpus(tmp_path / "corpus", files=2, rows=300)
    odd = tmp_path / "corpus" / "part-00009.parquet"  # a duplicate id (both copies rejected) and an empty text
    pq.write_table(pa.table({"id": ["doc-000100", "odd-1"], "text": ["a second doc-000100", None]}), odd)
    cfg = make_config(tmp_path)
    col = Collection(cfg)
    col.backfill(promote=True)
    changed, inserted, updated, _ = mutate(rows, n_insert=1, n_update=1, n_delete=0)
    write_rows(tmp_path / "corpus", changed, files=2)
    pq.write_table(pa.table({"id": ["doc-000100", "odd-1"], "text": ["a second doc-000100", None]}), odd)
    v2 = col.refresh(promote=True)
    segmented = [s.shard for s in v2.manifest.shards if s.segments]
    assert 1 <= len(segmented) <= 2 and v2.rejected == 3

    st = col.status(verify=False, staleness=False)
    a = st.active
    assert (a.id, a.segmented_shards, a.segments) == (v2.version, len(segmented), len(segmented))
    assert st.active.dead_rows == 1 and st.metrics()["active.segments"] == len(segmented)  # the updated row's old key

    # The corpus moves on (and its duplicate's file goes): a compaction still rebuilds v2's rows, reading none of it.
    write_rows(tmp_path / "corpus", mutate(changed, 30, 30, 30)[0], files=2)
    odd.unlink(missing_ok=True)
    main(["compact", "--config", _config_file(tmp_path), "--json", "--promote"])
    out = json.loads(capsys.readouterr().out)
    assert (out["parent"], out["aliases"], out["embedded"], out["reused"]) == (v2.version, ["active"], 0, v2.rows)
    assert (out["rows"], out["rejected"], out["rejected_by_reason"]) == (v2.rows, 3, v2.rejected_by_reason)
    m = read_manifest(Store(cfg.store.uri), "docs", out["version"])
    assert m.counts["kind"] == "compact" and m.counts["shards_reused"] == 3 - len(segmented)
    assert all(not s.segments and s.tombstones is None and s.dead == 0 for s in m.shards)
    assert [s.embeddings.version for s in m.shards] == [
        None if s.shard in segmented else v2.manifest.shards[s.shard].embeddings.version for s in m.shards
    ]
    assert m.inputs == v2.manifest.inputs and m.source == v2.manifest.source and m.index == v2.manifest.index
    assert [s.rejects for s in m.shards if s.rejects] and all(s.rejects.version is None for s in m.shards if s.rejects)
    assert_same_content(content(cfg, out["version"]), content(cfg, v2.version))
    assert col.verify(out["version"]).problems == []
    vi, v2i = col.index(out["version"]), col.index(v2.version)
    q = vi.embedder.embed_queries([changed[i] for i in sorted(updated | inserted)] + [changed["doc-000002"]])
    assert [[h.id for h in r] for r in vi.search_vectors(q, 10, exact=True)] == [
        [h.id for h in r] for r in v2i.search_vectors(q, 10, exact=True)
    ]
    assert col.status(verify=False, staleness=False).active.segments == 0
    with pytest.raises(VersionError, match="nothing to compact"):
        col.compact()
    # gc keeping only the compacted version drops v2 and its segments; v1 stays for the shards reused from it.
    assert col.gc(keep=1).deleted == [v2.version]
    assert col.verify(out["version"]).problems == []


def test_segments_on_s3(tmp_path, bucket):
    """The same on moto's S3: a delta refresh, search, dataset and verify read segments and tombstones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .test_s3 import s3_config

    name, options, fs = bucket
    rows = write_corpus(f"{name}/corpus", files=1, rows=300, fs=fs)
    cfg = s3_config(tmp_path, name, options)
    col = Collection(cfg)
    col.backfill(promote=True)
    changed, inserted, _, deleted = mutate(rows, 8, 8, 4)
    with fs.open(f"{name}/corpus/part-00000.parquet", "wb") as fh:
        pq.write_table(pa.table({"id": list(changed), "text": list(changed.values())}), fh)
    fs.invalidate_cache()
    child = col.refresh()
    assert child.manifest.counts["shards_delta"] >= 1
    assert col.verify(child.version).problems == []
    vi = col.index(child.version)
    new_id = sorted(inserted)[0]
    assert vi.search_text([changed[new_id]], k=1)[0][0].id == new_id
    gone = sorted(deleted)[0]
    assert gone not in {h.id for h in vi.search_text([rows[gone]], k=30)[0]}
    df = col.dataset(child.version).to_pandas()
    assert sorted(df["id"]) == sorted(changed)

    # gc keeping only the (now active) child keeps the version whose bases it holds; compaction on S3.
    col.promote(child.version, reason="segments on S3")
    out = col.gc(keep=1)
    assert out.deleted == [] and child.parent in out.kept
    assert col.verify(child.version).problems == []
    compacted = col.compact()
    assert all(not s.segments and s.tombstones is None for s in compacted.manifest.shards)
    assert_same_content(content(cfg, compacted.version), content(cfg, child.version))
    assert col.verify(compacted.version).problems == []
