"""Backfill end to end on a real local Ray, local disk and sqlite MLflow, with the hash backend."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embray import Collection
from embray.errors import ConfigError, SourceError, StoreError
from embray.lifecycle.registry import Registry
from embray.lifecycle.versions import list_versions
from embray.models import fingerprint, load_embedder
from embray.storage.rows import shard_of
from embray.storage.store import Store

from .helpers import free_port, make_config, write_corpus

pytestmark = pytest.mark.usefixtures("ray_local")


def _versions_dir(cfg) -> Path:
    return Path(cfg.store.uri) / cfg.collection / "versions"


def test_backfill_builds_a_complete_registered_version(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", files=3, rows=100)
    cfg = make_config(tmp_path)
    result = Collection(cfg).backfill()

    assert result.rows == 300 and result.rejected == 0 and result.promoted
    m = result.manifest
    assert m.fingerprint == fingerprint(cfg.model) == result.fingerprint
    assert m.dims == 64 and len(m.shards) == 3 and m.rows == 300
    assert m.source["files"] == 3 and m.source["id_type"] == "string"
    vdir = _versions_dir(cfg) / result.version
    assert json.loads((vdir / "manifest.json").read_text())["version"] == result.version
    assert not (vdir / "_staging").exists()

    embedder = load_embedder(cfg.model)
    seen = {}
    for s in m.shards:
        assert s.fingerprint == m.fingerprint
        for f in (s.embeddings, s.index):
            data = (vdir / f.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f.sha256 and len(data) == f.bytes
        part = pq.read_table(vdir / s.embeddings.path)
        assert part.schema.metadata[b"embray.fingerprint"] == m.fingerprint.encode()
        ids = part.column("id").to_pylist()
        assert ids == sorted(ids) and len(ids) == s.rows
        assert all(shard_of(i, 3) == s.shard for i in ids)  # hash-partitioned by id
        vectors = np.stack(part.column("vector").to_numpy(zero_copy_only=False))
        expected = embedder.embed_documents([corpus[i] for i in ids])
        np.testing.assert_allclose(vectors, expected, rtol=1e-6)
        for i, h in zip(ids, part.column("content_hash").to_pylist(), strict=True):
            seen[i] = h
    assert seen == {i: hashlib.sha256(t.encode()).hexdigest() for i, t in corpus.items()}

    reg = Registry(cfg)
    mv = reg.model_version(result.version)
    assert mv.source == result.uri and mv.run_id == m.mlflow_run_id
    assert mv.tags["embray.fingerprint"] == m.fingerprint
    assert (mv.tags["embray.dims"], mv.tags["embray.rows"], mv.tags["embray.shards"]) == ("64", "300", "3")
    assert reg.aliases() == {"active": result.version}
    run = reg.client.get_run(m.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["fingerprint"] == m.fingerprint and run.data.params["corpus_uri"] == cfg.source.uri
    assert run.data.metrics["rows"] == 300 and run.data.metrics["rows_per_s"] > 0
    import ray

    here = ray.get_runtime_context().get_node_id()  # one local node: the embedding ran on it
    assert result.embed_nodes == (here,) and result.to_dict()["embed_nodes"] == [here]
    assert run.data.params["embed.nodes"] == here
    # how the model ran and what its worker held: recorded per build
    assert result.embed_compute == ("hash fp32",) and run.data.params["embed.compute"] == "hash fp32"
    assert 50 < result.embed_worker_peak_rss_mib == run.data.metrics["embed.worker_peak_rss_mib"] < 4096
    assert result.to_dict()["embed_compute"] == ["hash fp32"]
    assert run.data.params["embed.layout"].startswith("1 actor(s) x all cores (1 CPU, 0.30 GiB each): embed.actors")
    (ds_input,) = run.inputs.dataset_inputs
    assert ds_input.dataset.digest == m.source["digest"][:36]
    assert json.loads(ds_input.dataset.source)["uri"] == cfg.source.uri


def test_later_versions_do_not_move_active_and_no_promote_sets_no_alias(tmp_path):
    write_corpus(tmp_path / "corpus", files=1, rows=50, int_ids=True)
    cfg = make_config(tmp_path)
    first = Collection(cfg).backfill(promote=False)
    assert not first.promoted and Registry(cfg).aliases() == {}
    second = Collection(cfg).backfill()
    assert second.promoted  # the first version that may be promoted becomes active
    third = Collection(cfg).backfill()
    assert not third.promoted
    assert Registry(cfg).aliases() == {"active": second.version}
    assert [m.version for m in list_versions(Store(cfg.store.uri), cfg.collection)] == sorted(
        [first.version, second.version, third.version]
    )
    assert first.manifest.source["id_type"] == "int64"
    assert first.manifest.content_digest == third.manifest.content_digest  # same content, same digest


def test_bad_rows_are_rejected_with_their_reason_and_counted(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(
        pa.table({"id": ["a", "b", "c", "d", "e", None], "text": ["ok one", None, "  ", "dup x", "fine", "no id"]}),
        corpus / "part-0.parquet",
    )
    pq.write_table(pa.table({"id": ["d", "f"], "text": ["dup y", "ok two"]}), corpus / "part-1.parquet")
    cfg = make_config(tmp_path, index={"shards": 2})
    result = Collection(cfg).backfill()
    m = result.manifest
    assert result.rows == 3 and result.rejected == 5
    assert m.counts["by_reason"] == {"null text": 1, "empty text": 1, "duplicate id": 2, "null id": 1}
    assert m.counts["input_rows"] == 8
    vdir = _versions_dir(cfg) / result.version
    rejects = pa.concat_tables([pq.read_table(vdir / s.rejects.path) for s in m.shards if s.rejects])
    got = sorted(zip(rejects.column("id").to_pylist(), rejects.column("reason").to_pylist(), strict=True), key=str)
    assert got == sorted(
        [
            ("b", "null text"),
            ("c", "empty text"),
            ("d", "duplicate id (2 rows share it)"),
            ("d", "duplicate id (2 rows share it)"),
            (None, "null id"),
        ],
        key=str,
    )
    assert set(rejects.column("text").to_pylist()) == {None, "  ", "dup x", "dup y", "no id"}
    assert all(p.endswith(".parquet") for p in rejects.column("path").to_pylist())
    metrics = Registry(cfg).client.get_run(m.mlflow_run_id).data.metrics
    assert metrics["rejected"] == 5 and metrics["rejected.duplicate_id"] == 2


def _no_version_left(cfg) -> None:
    d = _versions_dir(cfg)
    assert not d.exists() or list(d.iterdir()) == []
    assert list_versions(Store(cfg.store.uri), cfg.collection) == []


def test_missing_column_is_named_with_the_fix(tmp_path):
    write_corpus(tmp_path / "corpus", files=1, rows=5)
    cfg = make_config(tmp_path, source={"text_column": "body"})
    with pytest.raises(
        SourceError,
        match=r"has no column 'body' \(source\.text_column\); its columns are "
        r"\['id', 'text'\]: set source\.text_column",
    ):
        Collection(cfg).backfill()
    _no_version_left(cfg)


def test_non_string_text_and_corrupt_files_are_refused(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, files=1, rows=5)
    pq.write_table(pa.table({"id": ["x"], "text": [3]}), corpus / "part-9.parquet")
    cfg = make_config(tmp_path)
    with pytest.raises(SourceError, match=r"part-9\.parquet: column 'text' has type int64, not string"):
        Collection(cfg).backfill()
    (corpus / "part-9.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(SourceError, match=r"part-9\.parquet is not a readable Parquet file"):
        Collection(cfg).backfill()
    _no_version_left(cfg)


def test_failure_mid_run_leaves_no_visible_version(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, files=2, rows=200)
    # Footer intact (the schema check passes), data pages destroyed: reading fails inside Ray.
    path = corpus / "part-00001.parquet"
    data = bytearray(path.read_bytes())
    for i in range(4, len(data) // 2):
        data[i] = 0xFF
    path.write_bytes(bytes(data))
    cfg = make_config(tmp_path)
    with pytest.raises(SourceError, match=r"part-00001\.parquet cannot be read as Parquet \(OSError"):
        Collection(cfg).backfill()
    _no_version_left(cfg)
    reg = Registry(cfg)
    (run,) = reg.client.search_runs([reg.experiment_id()])
    assert run.info.status == "FAILED" and "SourceError" in run.data.tags["embray.error"]
    assert reg.model_versions() == [] and reg.aliases() == {}


def test_missing_source_and_unreachable_store(tmp_path):
    cfg = make_config(tmp_path)
    with pytest.raises(SourceError, match=r"source\.uri .*corpus does not exist"):
        Collection(cfg).backfill()
    write_corpus(tmp_path / "corpus", files=1, rows=5)
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = make_config(
        tmp_path,
        store={
            "uri": "s3://nowhere/embray",
            "storage_options": {
                "key": "k",
                "secret": "s",
                "client_kwargs": {"endpoint_url": dead},
                "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
            },
        },
        mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    with pytest.raises(StoreError, match=r"store s3://nowhere/embray is not reachable or not writable"):
        Collection(cfg).backfill()


def test_a_resource_no_node_offers_fails_at_once_naming_it(tmp_path):
    # embed.resources places embedding on the nodes that offer them; where none does, Ray would wait forever.
    # On a local Ray of this process no node can join: the build fails at once, naming the resource.
    write_corpus(tmp_path / "corpus", files=2, rows=20)
    cfg = make_config(tmp_path, embed={"resources": {"accelerator": 1}, "placement_timeout_s": 600})
    with pytest.raises(ConfigError, match=r"accelerator: 1.*no alive node has resource accelerator: start one with"):
        Collection(cfg).backfill()
    _no_version_left(cfg)
    assert Registry(cfg).model_versions() == []


def test_the_actor_pool_gets_the_costliest_chunks_first():
    # A shard's chunks are cut from its texts sorted by length, so its last chunk holds its fewest rows but its
    # longest texts: by rows alone it came last, and one actor embedded it alone at the end of the stage.
    from embray.pipeline.embed import costliest_first
    from embray.pipeline.types import Chunk

    shard = [Chunk("n0", "c0", 256, 9_800), Chunk("n1", "c1", 256, 87_000), Chunk("n2", "c2", 149, 140_000)]
    other = [Chunk("m0", "d0", 256, 87_000), Chunk("m1", "d1", 200, 87_000)]
    order = [c.need for c in costliest_first(shard + other)]
    assert order == ["n2", "n1", "m0", "m1", "n0"]  # characters first, then rows
