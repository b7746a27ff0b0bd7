"""The S3 path: a corpus and a store on moto's S3 server, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import pytest

from embray import Collection
from embray.errors import ConflictError
from embray.lifecycle.versions import file_rel, list_versions, read_manifest
from embray.storage.store import Store

from .helpers import doc_text, make_config, mutate, write_corpus

pytestmark = pytest.mark.usefixtures("ray_local")


def s3_config(tmp_path, bucket: str, options: dict):
    """A hash-backend collection whose corpus and store are in ``bucket`` on moto; MLflow on local sqlite."""
    return make_config(
        tmp_path,
        source={"uri": f"s3://{bucket}/corpus", "storage_options": options},
        store={"uri": f"s3://{bucket}/embray", "storage_options": options},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    )


def test_backfill_from_s3_to_s3_and_search(tmp_path, bucket):
    name, options, fs = bucket
    corpus = write_corpus(f"{name}/corpus", files=4, rows=60, fs=fs)
    cfg = s3_config(tmp_path, name, options)
    col = Collection(cfg)
    result = col.backfill()
    assert result.rows == 240 and result.uri == f"s3://{name}/embray/docs/versions/{result.version}"
    store = Store(cfg.store.uri, options)
    assert [m.version for m in list_versions(store, "docs")] == [result.version]
    keys = fs.find(f"{name}/embray/docs/versions/{result.version}")
    assert sum(k.endswith(".usearch") for k in keys) == 3 and not any("_staging" in k for k in keys)

    vi = col.index()  # the active alias, shards downloaded, checked and memory-mapped
    assert vi.version == result.version
    target = "doc-000123"
    (hits,) = vi.search_text([corpus[target]], k=5)
    assert hits[0].id == target and hits[0].score == pytest.approx(1.0, abs=1e-2)

    # The manifest is create-only on S3 too (If-None-Match: *): a second commit is refused.
    manifest = read_manifest(store, "docs", result.version)
    with pytest.raises(ConflictError, match=r"already exists; it is never overwritten"):
        store.create_exclusive(f"docs/versions/{result.version}/manifest.json", b"{}")
    assert read_manifest(store, "docs", result.version) == manifest
    assert doc_text(123) == corpus[target]


def test_refresh_migrate_verify_promote_gc_on_s3(tmp_path, bucket):
    from embray.lifecycle.registry import ACTIVE, CANDIDATE, Registry
    from embray.models import ModelSpec

    name, options, fs = bucket
    rows = write_corpus(f"{name}/corpus", files=2, rows=60, fs=fs)
    cfg = s3_config(tmp_path, name, options)
    store = Store(cfg.store.uri, options)
    col = Collection(cfg)
    v1 = col.backfill().version
    assert col.refresh().counts.embedded == 0
    changed, inserted, updated, deleted = mutate(rows, 4, 3, 2)
    for f in fs.find(f"{name}/corpus"):
        fs.rm(f)
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(f"{name}/corpus/part-00000.parquet", "wb") as fh:
        pq.write_table(pa.table({"id": list(changed), "text": list(changed.values())}), fh)
    fs.invalidate_cache()
    child = col.refresh()
    assert (child.counts.new, child.counts.changed, child.counts.deleted) == (4, 3, 2)
    assert child.counts.embedded == 7 and col.verify(child.version).problems == []
    cand = col.migrate(ModelSpec(backend="hash", name="words", dims=64, seed=5))
    assert Registry(cfg).aliases() == {ACTIVE: v1, CANDIDATE: cand.version}

    col.promote(child.version, reason="s3")
    vi = col.index()
    new_id = sorted(inserted)[0]
    assert vi.version == child.version and vi.search_text([changed[new_id]], k=1)[0][0].id == new_id
    assert col.rollback().active == v1

    # A corrupted object on S3 is caught, and the version cannot be promoted.
    m = read_manifest(store, "docs", child.version)
    key = f"{name}/embray/{file_rel(m, m.shards[0].embeddings)}"  # (a delta refresh's base is its parent's)
    fs.pipe_file(key, fs.cat_file(key)[:-10] + b"0123456789")
    assert any("checksum mismatch" in p for p in col.verify(child.version).problems)

    out = col.gc(keep=1)
    assert child.version in out.deleted and v1 in out.kept and cand.version in out.kept
    assert not fs.exists(f"{name}/embray/docs/versions/{child.version}/manifest.json")


def test_status_eval_audit_and_monitor_on_s3(tmp_path, bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embray.quality.monitor import read_status

    name, options, fs = bucket
    rows = write_corpus(f"{name}/corpus", files=2, rows=60, fs=fs)
    cfg = s3_config(tmp_path, name, options)
    col = Collection(cfg)
    v1 = col.backfill().version
    ids = sorted(rows)
    for i in ids[:6]:
        rows[i] += " revised"
    with fs.open(f"{name}/corpus/part-00000.parquet", "wb") as fh:
        pq.write_table(pa.table({"id": ids[:60], "text": [rows[i] for i in ids[:60]]}), fh)
    fs.invalidate_cache()

    st = col.status()
    assert (st.staleness.changed, st.staleness.fraction) == (6, 0.05) and st.consistent is True
    assert st.ok  # 5% is not above the default threshold
    col.record_status(st)
    assert read_status(Store(cfg.store.uri, options), "docs").staleness.changed == 6
    assert col.eval(v1).recall_at_10 >= 0.95
    a = col.audit(v1, sample=120, seed=1)
    assert a.ok and a.compared == 114 and a.source_changed == 6

    strict = Collection(cfg.model_copy(update={"monitor": cfg.monitor.model_copy(update={"max_stale_fraction": 0.01})}))
    step = strict.check(promote_if_gates_pass=True)
    assert step.action.promoted == step.action.refreshed != v1
    assert strict.status().ok


def test_refresh_on_s3_reads_only_the_file_whose_etag_changed(tmp_path, bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq

    name, options, fs = bucket
    write_corpus(f"{name}/corpus", files=3, rows=40, fs=fs)
    cfg = s3_config(tmp_path, name, options)
    col = Collection(cfg)
    parent = col.backfill()
    assert all(i.etag and i.sha256 is None for i in parent.manifest.inputs)  # S3 gives a content tag: no hashing

    path = f"{name}/corpus/part-00001.parquet"
    with fs.open(path, "rb") as fh:
        t = pq.read_table(fh)
    texts = t.column("text").to_pylist()
    texts[0] = texts[0][:-1] + ("X" if texts[0][-1] != "X" else "Y")  # one row, same length
    with fs.open(path, "wb") as fh:
        pq.write_table(t.set_column(1, "text", pa.array(texts)), fh)

    assert col.refresh(dry_run=True).source_files.to_dict() == {"read": 1, "reused": 2}
    child = col.refresh()
    assert child.source_files.to_dict() == {"read": 1, "reused": 2}
    assert child.counts.changed == 1 and child.counts.embedded == 1
    assert col.verify(child.version).ok


def test_metadata_filters_fields_and_keywords_on_s3(tmp_path, bucket):
    """Kept columns, filters, fields and keyword search with the corpus and the store on moto S3, through a
    refresh that changes metadata only (its delta segments, tombstones and keyword indexes downloaded and
    checked like every other version file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name, options, fs = bucket

    def write(rows: dict, tenants: dict) -> None:
        for f in range(2):
            items = sorted(rows.items())[f::2]
            table = pa.table(
                {"id": [i for i, _ in items], "text": [t for _, t in items], "tenant": [tenants[i] for i, _ in items]}
            )
            with fs.open(f"{name}/corpus/part-{f}.parquet", "wb") as fh:
                pq.write_table(table, fh)

    rows = {f"doc-{i:04d}": doc_text(i) + (" fails with ERR_CONN_RESET" if i % 30 == 7 else "") for i in range(120)}
    tenants = {i: ("acme", "globex")[n % 2] for n, i in enumerate(sorted(rows))}
    write(rows, tenants)
    cfg = make_config(
        tmp_path,
        source={"uri": f"s3://{name}/corpus", "storage_options": options, "columns": ["tenant"]},
        store={"uri": f"s3://{name}/embray", "storage_options": options},
        index={"keywords": True, "max_delta_fraction": 0.5},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    col = Collection(cfg)
    col.backfill(promote=True)
    acme = {i for i, t in tenants.items() if t == "acme"}
    hits = col.search("river", k=500, filter={"tenant": "acme"}, fields=["tenant", "text"]).results
    assert {h.id for h in hits} == acme and all(h.fields["text"] == rows[h.id] for h in hits)
    named = {i for i, t in rows.items() if "ERR_CONN_RESET" in t}
    assert {h.id for h in col.search("ERR_CONN_RESET", k=len(named), mode="keyword").results} == named

    moved = sorted(named)[:2]
    write(rows, {**tenants, **{i: "umbrella" for i in moved}})
    r = col.refresh(promote=True)
    assert (r.counts.changed, r.counts.embedded) == (2, 0) and r.manifest.counts["shards_delta"] >= 1
    assert col.verify(r.version).ok
    got = col.search("ERR_CONN_RESET", k=len(named), mode="hybrid", filter={"tenant": "umbrella"}).results
    assert {h.id for h in got} == set(moved)
