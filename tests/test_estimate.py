"""Cost before you spend it: dry runs estimate what a build would embed, touch, take and add; builds record
the estimate beside the actual in MLflow."""

from __future__ import annotations

import json

import pytest

from embray import Collection
from embray.cli import main
from embray.quality.estimate import PastBuild, bytes_per_row, estimate

from .helpers import make_config, mutate, write_corpus, write_rows

OTHER_SPACE = {"backend": "hash", "name": "words-v2", "dims": 48, "seed": 1}


def test_the_estimate_comes_from_earlier_builds_or_says_there_is_none(tmp_path):
    cfg = make_config(tmp_path, embed={"actors": 2, "num_cpus": 1, "num_gpus": 0.5})
    args = {"to_embed": 1000, "rows": 10_000, "rows_written": 4000, "shards": {"rebuilt": 1, "updated": 2}, "dims": 64}
    none = estimate(cfg, history=[], **args)
    assert none.seconds is None and none.gpu_hours is None and "no earlier build" in none.basis
    assert (none.shards_rebuilt, none.shards_updated, none.shards_reused) == (1, 2, 0)
    assert none.bytes_added == int(4000 * bytes_per_row(64, "f16", 16))
    tiny = [PastBuild("r0", embedded=10, embed_seconds=5.0, other_seconds=1.0, rows=10)]  # too small to go by
    assert estimate(cfg, history=tiny, **args).seconds is None
    history = [
        PastBuild("r1", embedded=500, embed_seconds=5.0, other_seconds=2.0, rows=2000),  # 100 texts/s, 1 ms/row
        PastBuild("r2", embedded=400, embed_seconds=2.0, other_seconds=6.0, rows=2000),  # 200 texts/s, 3 ms/row
        PastBuild("r3", embedded=300, embed_seconds=1.0, other_seconds=4.0, rows=2000),  # 300 texts/s, 2 ms/row
    ]
    e = estimate(cfg, history=history, **args)
    assert e.texts_per_s == 200.0
    assert e.seconds == pytest.approx(1000 / 200 + 0.002 * 10_000)
    assert e.cpu_hours == pytest.approx(5 * 2 * 1 / 3600, abs=1e-4) and e.gpu_hours == pytest.approx(
        5 * 2 * 0.5 / 3600, abs=1e-4
    )
    assert "median of 3 earlier build(s)" in e.basis


@pytest.mark.usefixtures("ray_local")
def test_dry_runs_estimate_and_builds_record_estimate_vs_actual(tmp_path, capsys):
    rows = write_corpus(tmp_path / "corpus", files=3, rows=200)
    cfg = make_config(tmp_path, index={"shards": 4})
    col = Collection(cfg)
    first = col.backfill()

    changed, *_ = mutate(rows, n_insert=30, n_update=20, n_delete=5)
    write_rows(tmp_path / "corpus", changed)
    plan = col.refresh(dry_run=True)
    e = plan.estimate
    assert e.to_embed == plan.to_embed == 50
    assert e.shards_rebuilt + e.shards_updated + e.shards_reused + e.shards_delta == 4 and e.shards_delta > 0
    assert e.seconds is not None and e.seconds > 0 and "1 earlier build" in e.basis
    assert e.bytes_added > 0
    assert plan.to_dict()["estimate"] == e.to_dict()

    child = col.refresh()
    metrics = col.registry.client.get_run(child.manifest.mlflow_run_id).data.metrics
    assert metrics["estimate.to_embed"] == metrics["embedded"] == 50
    assert metrics["estimate.seconds"] == e.seconds and metrics["seconds"] > 0
    assert metrics["bytes_added"] > 0 and metrics["estimate.bytes_added"] > 0

    migration = col.migrate(OTHER_SPACE, dry_run=True)
    assert migration.to_embed == len(changed) and migration.parent == child.parent  # active is still `first`
    assert migration.estimate.shards_rebuilt == 4 and migration.estimate.seconds is None  # a new model: no history
    assert [v.id for v in col.versions()] == [first.version, child.version]  # a dry run commits nothing
    assert col.aliases() == {"active": first.version}

    (tmp_path / "embray.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    (tmp_path / "other.yaml").write_text(json.dumps({"model": OTHER_SPACE}))
    capsys.readouterr()
    main(
        [
            "migrate",
            "--config",
            str(tmp_path / "embray.yaml"),
            "--model",
            str(tmp_path / "other.yaml"),
            "--dry-run",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] is True and out["version"] is None and out["estimate"]["to_embed"] == len(changed)
    main(["refresh", "--config", str(tmp_path / "embray.yaml"), "--from", child.version, "--dry-run"])
    human = capsys.readouterr().out
    assert "shards: 0 rebuilt, 0 updated, 4 reused" in human and "about" in human
