"""verify, promote, rollback, gc and the writer lease, on real Ray, local disk and sqlite MLflow."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embray import Collection
from embray.errors import ConflictError, GateError, VersionError
from embray.lifecycle.lock import WRITER, Lease
from embray.lifecycle.registry import ACTIVE, CANDIDATE, Registry
from embray.lifecycle.versions import file_rel, list_versions, read_manifest
from embray.models import ModelSpec
from embray.storage.store import Store

from .helpers import make_config, mutate, write_corpus, write_rows

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture
def three(tmp_path):
    """A collection with three versions: v1 (active), v2 (a refresh), v3 (a migration, candidate)."""
    rows = write_corpus(tmp_path / "corpus", files=2, rows=120)
    cfg = make_config(tmp_path)
    col = Collection(cfg)
    v1 = col.backfill()
    write_rows(tmp_path / "corpus", mutate(rows, 5, 5, 5)[0])
    v2 = col.refresh()
    v3 = col.migrate(ModelSpec(backend="hash", name="words", dims=64, seed=9))
    return cfg, v1.version, v2.version, v3.version


def _store(cfg) -> Store:
    return Store(cfg.store.uri, cfg.store.storage_options)


def test_verify_passes_sound_versions_and_catches_a_corrupted_file(three):
    cfg, v1, v2, _ = three
    store = _store(cfg)
    col = Collection(cfg)
    assert col.verify(v1).problems == [] and col.verify(v2).problems == []
    m = read_manifest(store, cfg.collection, v2)
    path = store.path(file_rel(m, m.shards[1].index))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    problems = col.verify(v2).problems
    assert len(problems) == 1 and "checksum mismatch" in problems[0] and "shard-00001.usearch" in problems[0]
    with pytest.raises(GateError, match=r"refusing to promote .*verify: .*checksum mismatch"):
        col.promote(v2, force=True, reason="force never overrides verify")
    assert col.verify("v19990101T000000Z-000000").problems[0].startswith("version v1999")


def test_verify_catches_a_version_that_mixes_fingerprints(three):
    cfg, v1, _, v3 = three
    store = _store(cfg)
    # Forge a version: v1's manifest, with shard 0's part and index swapped for v3's (another model).
    m1, m3 = read_manifest(store, cfg.collection, v1), read_manifest(store, cfg.collection, v3)
    forged = "v20990101T000000Z-f0f0f0"
    shards = list(m1.shards)
    s3 = m3.shards[0]
    shards[0] = s3.model_copy(
        update={
            "fingerprint": m1.fingerprint,  # the manifest even claims the right space
            "embeddings": s3.embeddings.model_copy(update={"version": v3}),
            "index": s3.index.model_copy(update={"version": v3}),
        }
    )
    shards[1:] = [
        s.model_copy(update={f: getattr(s, f).model_copy(update={"version": v1}) for f in ("embeddings", "index")})
        for s in shards[1:]
    ]
    fake = m1.model_copy(update={"version": forged, "shards": shards})
    store.write_bytes(f"{cfg.collection}/versions/{forged}/manifest.json", fake.to_json())
    problems = Collection(cfg).verify(forged).problems
    assert any("embeddings part has fingerprint" in p and m3.fingerprint in p for p in problems), problems


def test_promote_rollback_and_their_record_in_mlflow(three):
    cfg, v1, v2, v3 = three
    reg = Registry(cfg)
    col = Collection(cfg)
    out = col.promote(v2, reason="fresher")
    assert (out.active, out.previous, out.forced) == (v2, v1, False)
    assert [g.gate for g in out.gates] == ["verify", "recall_at_10"] and all(g.passed for g in out.gates)
    tags = reg.model_version(v2).tags
    assert tags["embray.promote_reason"] == "fresher" and tags["embray.previous_active"] == v1
    assert tags["embray.promote_by"] and tags["embray.promote_at"]
    col.promote(v3)
    aliases = reg.aliases()
    assert aliases[ACTIVE] == v3 and CANDIDATE not in aliases  # the candidate was promoted
    assert col.rollback(reason="bad results").to_dict() == {"active": v2, "previous": v3}
    assert reg.model_version(v2).tags["embray.rollback_reason"] == "bad results"
    assert col.rollback().to_dict() == {"active": v1, "previous": v2}
    with pytest.raises(VersionError, match=r"no earlier active version to roll back to"):
        col.rollback()


def test_concurrent_promotes_leave_the_alias_on_a_requested_version(three):
    cfg, v1, v2, v3 = three
    errors = []

    def go(v):
        try:
            Collection(cfg).promote(v)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    for _ in range(2):
        threads = [threading.Thread(target=go, args=(v,)) for v in (v2, v3, v2, v3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        reg = Registry(cfg)
        active = reg.aliases()[ACTIVE]
        assert active in (v2, v3)
        history = json.loads(reg.model_tag("embray.active_history"))
        assert history[-1] == active  # the record agrees with the alias: each move landed whole


def test_second_writer_fails_fast_naming_the_running_job(tmp_path):
    write_corpus(tmp_path / "corpus", files=1, rows=50)
    cfg = make_config(tmp_path)
    store = _store(cfg)
    with Lease(store, cfg.collection, WRITER, job="refresh", ttl_s=30):
        t0 = time.monotonic()
        with pytest.raises(ConflictError, match=r"busy: refresh run by .* holds its writer lease"):
            Collection(cfg).backfill()
        assert time.monotonic() - t0 < 10
        with pytest.raises(ConflictError, match=r"busy: refresh"):
            Collection(cfg).gc(keep=1)
    assert list_versions(store, cfg.collection) == []
    Collection(cfg).backfill()  # released: the next writer proceeds


def test_an_expired_lease_is_taken_over(tmp_path):
    write_corpus(tmp_path / "corpus", files=1, rows=50)
    cfg = make_config(tmp_path)
    store = _store(cfg)
    # A holder on another host that stopped renewing 10 s ago.
    record = {
        "job": "backfill",
        "holder": "ghost@elsewhere",
        "host": "elsewhere",
        "pid": 1,
        "token": "dead",
        "acquired": "2026-01-01T00:00:00+00:00",
        "expires_at": time.time() - 10,
    }
    locks = f"{cfg.collection}/_locks"
    store.write_bytes(f"{locks}/writer/g000000000001.json", json.dumps({**record, "generation": 1}).encode())
    store.write_bytes(f"{locks}/writer.json", json.dumps({**record, "generation": 1}).encode())
    assert Collection(cfg).backfill().rows == 50
    fence = json.loads(store.read_bytes(f"{locks}/writer/g000000000001.end"))
    assert fence["end"] == "fenced" and fence["job"] == "backfill"  # the ghost can never commit now
    done = json.loads(store.read_bytes(f"{locks}/writer/g000000000002.end"))
    assert done["end"] == "commit" and done["path"].endswith("/manifest.json")
    assert json.loads(store.read_bytes(f"{locks}/writer/g000000000002.json"))["released"] is True


def test_gc_keeps_aliased_and_referenced_versions(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=2, rows=100)
    cfg = make_config(tmp_path, index={"max_delta_fraction": 0})  # no delta segments: v3 holds whole shards
    store = _store(cfg)
    col = Collection(cfg)
    v1 = col.backfill().version  # active
    v2 = col.refresh().version  # unchanged: reuses every file of v1
    write_rows(tmp_path / "corpus", mutate(rows, 3, 3, 3)[0])
    v3 = col.refresh(promote=True).version  # active now; rebuilt shards, no reference to v1
    v4 = col.refresh().version  # reuses v3's files
    # A killed build's leftovers: a version directory without a manifest.
    orphan = f"{cfg.collection}/versions/v20261126T000000Z-dead00"
    store.write_bytes(f"{orphan}/embeddings/shard-00000.parquet", b"partial")
    # v1 and v2 are old, unaliased; v4 (newest) references v3, which is active anyway.
    plan = col.gc(keep=1, dry_run=True)
    assert set(plan.deleted) == {v1, v2} and set(plan.kept) == {v3, v4}
    assert plan.unfinished == ["v20261126T000000Z-dead00"]
    assert len(list_versions(store, cfg.collection)) == 4  # a dry run deletes nothing

    # Make v2 the candidate: then v2 stays, and with it v1, whose files v2 reuses.
    Registry(cfg).set_alias(CANDIDATE, v2)
    out = col.gc(keep=1)
    assert set(out.deleted) == set() and set(out.kept) == {v1, v2, v3, v4}
    assert not store.exists(orphan)
    Registry(cfg).delete_alias(CANDIDATE)
    out = col.gc(keep=1)
    assert set(out.deleted) == {v1, v2}
    assert [m.version for m in list_versions(store, cfg.collection)] == [v3, v4]
    assert Registry(cfg).registered_versions() == {v3, v4}
    assert col.verify(v4).problems == [] and col.verify(v3).problems == []


def test_gc_drops_the_cache_of_models_no_version_uses(tmp_path):
    write_corpus(tmp_path / "corpus", files=1, rows=60)
    cfg = make_config(tmp_path)
    store = _store(cfg)
    col = Collection(cfg)
    col.backfill()
    candidate = col.migrate(ModelSpec(backend="hash", name="words", dims=64, seed=3))
    caches = store.listdir(f"{cfg.collection}/cache")
    assert len(caches) == 2
    assert col.gc(keep=1).caches == []  # the candidate stays (aliased), so does its cache
    Registry(cfg).delete_alias(CANDIDATE)
    col.refresh()  # the newest version now, in the active model's space
    out = col.gc(keep=1)
    assert out.deleted == [candidate.version] and out.caches == [candidate.fingerprint]
    assert store.listdir(f"{cfg.collection}/cache") == [
        read_manifest(store, cfg.collection, Registry(cfg).aliases()[ACTIVE]).fingerprint
    ]


def test_a_damaged_cache_file_is_only_a_miss(tmp_path):
    write_corpus(tmp_path / "corpus", files=1, rows=60)
    cfg = make_config(tmp_path, embed={"batch_size": 8})  # several cache chunks per shard
    store = _store(cfg)
    col = Collection(cfg)
    first = col.backfill(promote=False)
    cache = store.path(f"{cfg.collection}/cache")
    files = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs]
    with open(files[0], "wb") as fh:
        fh.write(b"PAR1 truncated")
    second = col.backfill(promote=False)
    assert 0 < second.counts.embedded < 60
    assert second.manifest.content_digest == first.manifest.content_digest
    shutil.rmtree(cache)
    assert col.backfill(promote=False).counts.embedded == 60
    # A cache file from another space is never used, even when placed in this space's directory.
    last = list_versions(store, cfg.collection)[-1]
    hashes = [
        h
        for sh in last.shards
        for h in pq.read_table(store.path(file_rel(last, sh.embeddings))).column("content_hash").to_pylist()
    ]
    shutil.rmtree(cache)
    os.makedirs(os.path.dirname(files[0]))
    foreign = pa.table({"content_hash": hashes, "vector": [[1.0] + [0.0] * 63] * len(hashes)})
    pq.write_table(foreign.replace_schema_metadata({b"embray.fingerprint": b"0" * 24}), files[0])
    again = col.backfill(promote=False)
    assert again.counts.embedded == 60 and again.manifest.content_digest == first.manifest.content_digest
    assert col.verify(again.version).problems == []
