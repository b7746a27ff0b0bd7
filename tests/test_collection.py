"""The Python API: the whole lifecycle through ``embray.Collection`` alone (no CLI), on local disk and moto S3."""

from __future__ import annotations

import json

import numpy as np
import pytest

import embray
from embray import (
    BuildResult,
    Collection,
    ConfigError,
    GateError,
    PlanResult,
    SearchResult,
    StatusReport,
    VersionError,
    load_embedder,
)
from embray.cli import main

from .helpers import content, make_config, mutate, write_corpus, write_rows

pytestmark = pytest.mark.usefixtures("ray_local")

OTHER_SPACE = {"backend": "hash", "name": "words-v2", "dims": 48, "seed": 1}


def _dataset_rows(ds) -> dict:
    """id -> (content_hash, vector) of a Ray Dataset made by Collection.dataset()."""
    out = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        vecs = np.stack(batch["vector"]).astype(np.float32)
        for i, h, v in zip(batch["id"].tolist(), batch["content_hash"].tolist(), vecs, strict=True):
            out[i] = (h, v)
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0]
        np.testing.assert_array_equal(a[k][1], b[k][1])


def test_the_whole_lifecycle_through_collection_alone(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=3, rows=120)
    col = Collection(make_config(tmp_path))

    first = col.backfill()
    assert isinstance(first, BuildResult) and first.promoted and first.rows == 360
    assert col.resolve() == col.resolve("active") == first.version
    assert col.aliases() == {"active": first.version}

    changed, inserted, updated, deleted = mutate(rows, n_insert=9, n_update=6, n_delete=4)
    write_rows(tmp_path / "corpus", changed)
    plan = col.refresh(dry_run=True)
    assert isinstance(plan, PlanResult)
    assert (plan.counts.new, plan.counts.changed, plan.counts.deleted) == (9, 6, 4)
    assert plan.to_embed == 15 and plan.counts.embedded == 0
    assert [v.id for v in col.versions()] == [first.version]  # a dry run commits nothing

    child = col.refresh(promote=True)
    assert child.parent == first.version and child.counts.embedded == 15 and child.aliases == ("active",)
    assert col.search("river mountain forest", k=3).version == child.version

    migrated = col.migrate(OTHER_SPACE)
    assert migrated.aliases == ("candidate",) and migrated.fingerprint != child.fingerprint
    assert col.resolve("candidate") == migrated.version
    assert col.verify(migrated.version).ok
    report = col.gates("candidate")
    assert report.passed and [g.gate for g in report.gates] == ["verify", "recall_at_10"]

    promoted = col.promote("candidate", reason="new model")
    assert (promoted.active, promoted.previous, promoted.forced) == (migrated.version, child.version, False)
    hit = col.search("river mountain forest", k=3)
    assert (hit.version, hit.fingerprint) == (migrated.version, migrated.fingerprint)

    back = col.rollback(reason="compare")
    assert (back.active, back.previous) == (child.version, migrated.version)
    assert col.search("river mountain forest", k=3).version == child.version

    st = col.status()
    assert isinstance(st, StatusReport) and st.ok and st.active.id == child.version
    assert st.staleness.stale == 0
    ev = col.eval(child.version, against=first.version)
    assert ev.recall_at_10 >= 0.95 and ev.overlap_at_10 is not None
    assert col.audit(child.version, sample=50, seed=1).ok

    # keep 1: the newest (migrated), the aliased (child is active), and what they reuse files from
    expected = {migrated.version, child.version} | child.manifest.referenced_versions()
    dry = col.gc(1, dry_run=True)
    assert dry.dry_run and set(dry.kept) == expected
    assert [v.id for v in col.versions()] == [first.version, child.version, migrated.version]  # nothing deleted yet
    swept = col.gc(1)
    assert set(swept.kept) == expected and {v.id for v in col.versions()} == expected
    for v in expected:
        assert col.verify(v).ok


def test_results_are_the_cli_json(tmp_path, capsys):
    """A CLI command is a thin caller: its --json is the result's to_dict()."""
    write_corpus(tmp_path / "corpus", files=2, rows=50)
    cfg = make_config(tmp_path)
    (tmp_path / "embray.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    col = Collection.open(tmp_path / "embray.yaml")
    built = col.backfill()
    capsys.readouterr()
    main(["versions", "--config", str(tmp_path / "embray.yaml"), "--json"])
    assert json.loads(capsys.readouterr().out) == [v.to_dict() for v in col.versions()]
    main(["verify", built.version, "--config", str(tmp_path / "embray.yaml"), "--json"])
    assert json.loads(capsys.readouterr().out) == col.verify(built.version).to_dict()
    main(["search", "--config", str(tmp_path / "embray.yaml"), "river", "-k", "4", "--json"])
    assert json.loads(capsys.readouterr().out) == col.search("river", k=4).to_dict()


def test_dataset_round_trips_a_refreshed_version_exactly(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=3, rows=80)
    cfg = make_config(tmp_path, index={"shards": 4})
    col = Collection(cfg)
    col.backfill()
    changed, *_ = mutate(rows, n_insert=3, n_update=0, n_delete=0)
    write_rows(tmp_path / "corpus", changed)
    child = col.refresh(promote=True)
    assert child.manifest.counts["shards_reused"] > 0  # some rows come from the parent's files
    assert child.manifest.referenced_versions() == {child.parent}

    ds = col.dataset()
    assert ds.count() == child.rows == len(changed)
    _same(_dataset_rows(ds), content(cfg, child.version))
    _same(_dataset_rows(col.dataset(child.parent)), content(cfg, child.parent))

    # a downstream Ray job over the vectors: they are the unit vectors embray stored
    norms = ds.map_batches(lambda b: {"norm": np.linalg.norm(np.stack(b["vector"]), axis=1)}, batch_format="numpy")
    np.testing.assert_allclose(norms.to_pandas()["norm"].to_numpy(), 1.0, atol=1e-5)


def test_repeat_searches_reuse_the_open_version_until_the_alias_moves(tmp_path, monkeypatch):
    import embray.collection as collection_module

    write_corpus(tmp_path / "corpus", files=2, rows=60)
    col = Collection(make_config(tmp_path, serve={"poll_s": 3600}))
    first = col.backfill()
    opened, alias_reads = [], []
    real_index, real_aliases = collection_module.VersionIndex, type(col.registry).aliases
    monkeypatch.setattr(collection_module, "VersionIndex", lambda *a, **kw: opened.append(a) or real_index(*a, **kw))
    monkeypatch.setattr(type(col.registry), "aliases", lambda self: alias_reads.append(1) or real_aliases(self))

    for i in range(1000):
        assert col.search(f"river {i}", k=2).version == first.version
    assert len(opened) == 1 and len(alias_reads) == 1  # one open, one alias read, for a thousand searches
    embedder = col.index().embedder
    col.search("ocean")
    assert col.index().embedder is embedder

    write_corpus(tmp_path / "corpus", files=1, rows=5, start=900)
    child = col.refresh(promote=True)  # this object moved the alias: the next search follows it at once
    assert col.search("river").version == child.version
    assert len(opened) == 2
    # another process (another Collection) moving the alias is seen after serve.poll_s
    Collection(make_config(tmp_path)).rollback()
    assert col.search("river").version == child.version  # within poll_s: still the cached resolution
    col._active = (col._active[0], col._active[1] - 3601)  # poll_s elapsed
    assert col.search("river").version == first.version


def test_vector_queries_must_name_their_space(tmp_path):
    write_corpus(tmp_path / "corpus", files=2, rows=40)
    col = Collection(make_config(tmp_path))
    built = col.backfill()
    spec = col.manifest().model
    vec = load_embedder(spec).embed_queries(["river mountain"])[0]
    by_vector = col.search(vector=vec, fingerprint=built.fingerprint, k=5)
    assert isinstance(by_vector, SearchResult)
    assert by_vector.to_dict() == col.search("river mountain", k=5).to_dict()
    with pytest.raises(VersionError, match="was made in space None"):
        col.search(vector=vec, k=5)
    with pytest.raises(VersionError, match="exactly one of text or vector"):
        col.search()
    with pytest.raises(ConfigError, match="k=0"):
        col.search("river", k=0)


def test_clear_errors_for_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="not a valid collection name"):
        Collection({"collection": "Bad Name", "source": {"uri": "x"}})
    with pytest.raises(ConfigError, match="use Collection.open"):
        Collection(42)
    with pytest.raises(ConfigError, match="does not exist"):
        Collection.open(tmp_path / "missing.yaml")
    write_corpus(tmp_path / "corpus", files=1, rows=20)
    col = Collection(make_config(tmp_path))
    with pytest.raises(VersionError, match="no 'active' version yet"):
        col.resolve()
    col.backfill()
    with pytest.raises(VersionError, match="does not exist or was never committed"):
        col.resolve("v20200101T000000000Z-abcdef")
    with pytest.raises(ConfigError, match="keep at least 1"):
        col.gc(0)
    with pytest.raises(ConfigError, match="--force needs --reason"):
        col.promote("active", force=True)
    with pytest.raises(ConfigError, match="needs dims"):
        col.migrate({"backend": "hash", "name": "x"})


def test_a_gate_refusal_changes_nothing(tmp_path):
    write_corpus(tmp_path / "corpus", files=2, rows=60)
    col = Collection(make_config(tmp_path))
    first = col.backfill()
    broken = col.migrate(OTHER_SPACE)
    m = col.manifest(broken.version)
    (tmp_path / "store" / "docs" / "versions" / broken.version / m.shards[0].index.path).write_bytes(b"damaged")
    assert not col.verify("candidate").ok
    with pytest.raises(GateError, match="verify"):
        col.promote("candidate", force=True, reason="verify is never overridden")
    assert col.aliases() == {"active": first.version, "candidate": broken.version}
    assert col.search("river").version == first.version


def test_the_lifecycle_on_s3(tmp_path, bucket):
    name, options, fs = bucket
    rows = write_corpus(f"{name}/corpus", files=2, rows=60, fs=fs)
    cfg = make_config(
        tmp_path,
        source={"uri": f"s3://{name}/corpus", "storage_options": options},
        store={"uri": f"s3://{name}/store", "storage_options": options},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    col = Collection(cfg)
    first = col.backfill()
    changed, *_ = mutate(rows, n_insert=4, n_update=2, n_delete=1)
    for f in fs.ls(f"{name}/corpus"):
        fs.rm(f)
    local = tmp_path / "changed"
    write_rows(local, changed, files=2)
    for f in sorted(local.glob("*.parquet")):
        fs.put(str(f), f"{name}/corpus/{f.name}")
    assert col.refresh(dry_run=True).to_embed == 6
    child = col.refresh(promote=True)
    assert child.counts.embedded == 6 and col.resolve() == child.version
    assert col.search("river", k=3).version == child.version
    assert col.verify(child.version).ok and col.status(verify=False).staleness.stale == 0
    _same(_dataset_rows(col.dataset()), content(cfg, child.version))
    assert col.rollback().active == first.version


def test_the_public_surface():
    for name in ("Collection", "Config", "load_config", "ModelSpec", "load_embedder", "BuildResult", "PlanResult"):
        assert name in embray.__all__ and hasattr(embray, name)
    assert issubclass(embray.RegistryError, embray.EmbrayError)
    assert not [n for n in embray.__all__ if n.startswith("_")]


def test_a_refresh_shares_its_parents_loaded_encoder_and_another_space_never_does(tmp_path):
    """Opening a refreshed version beside its parent (as a Serve replica does at a switch) reuses the
    encoder already loaded for the same fingerprint, instead of a second copy of the model."""
    from embray.models import ModelSpec

    rows = write_corpus(tmp_path / "corpus", files=2, rows=60)
    col = embray.Collection(make_config(tmp_path))
    v1 = col.backfill().version
    write_rows(tmp_path / "corpus", mutate(rows, 3, 3, 3)[0], files=2)
    v2 = col.refresh().version
    first = col.index(v1)
    assert first.loaded_embedder is None
    first.search_text(["river"], k=1)  # loads it
    second = col.index(v2)
    assert second.loaded_embedder is first.loaded_embedder is not None
    assert second.search_text([rows["doc-000007"]], k=1)[0][0].id == "doc-000007"

    v3 = col.migrate(ModelSpec(backend="hash", name="words", dims=32)).version
    third = col.index(v3)
    assert third.loaded_embedder is None  # another vector space: its own model
    assert third.embedder is not first.loaded_embedder and third.embedder.dims == 32
