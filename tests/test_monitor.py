"""status and the monitor loop on a real local Ray, local disk and sqlite MLflow (hash backend)."""

from __future__ import annotations

import datetime as dt
import json
import runpy
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embray import Collection
from embray.cli import main
from embray.lifecycle.registry import ACTIVE, Registry
from embray.lifecycle.versions import file_rel, read_manifest
from embray.models import ModelSpec
from embray.quality.monitor import read_status
from embray.storage.store import Store

from .helpers import REPO, make_config, write_corpus, write_rows, write_with_times

pytestmark = pytest.mark.usefixtures("ray_local")

UTC = dt.timezone.utc


def cli_json(capsys, *args) -> tuple[int, object]:
    """Run the CLI in this process (the session's Ray); returns (exit code, parsed stdout)."""
    code = 0
    try:
        main([*args, "--json"])
    except SystemExit as e:
        code = e.code or 0
    return code, json.loads(capsys.readouterr().out)


def test_status_reports_staleness_oldest_change_verify_and_exit_code(tmp_path, capsys):
    rows = write_corpus(tmp_path / "corpus", files=2, rows=100)
    base = dt.datetime(2026, 11, 1, tzinfo=UTC)
    write_with_times(tmp_path / "corpus", rows, dict.fromkeys(rows, base))
    cfg = make_config(tmp_path, monitor={"max_stale_fraction": 0.05})
    v1 = Collection(cfg).backfill().version
    config = tmp_path / "embray.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML

    code, st = cli_json(capsys, "status", "--config", str(config))
    assert code == 0 and st["ok"] and st["problems"] == []
    assert st["active"]["id"] == v1 and st["active"]["fingerprint"] and 0 <= st["active"]["age_s"] < 600
    assert {k: st["staleness"][k] for k in ("new", "changed", "deleted", "fraction")} == {
        "new": 0,
        "changed": 0,
        "deleted": 0,
        "fraction": 0.0,
    }
    assert st["consistent"] is True and st["served"] is None and st["candidate"] is None

    # 6 changed (one of them long ago), 3 deleted, 4 new: (6 + 3 + 4) / (200 + 4) stale, above 5%.
    ids = sorted(rows)
    times = dict.fromkeys(rows, base)
    changed = ids[:6]
    for i in changed:
        rows[i] += " revised"
        times[i] = dt.datetime(2026, 11, 20, tzinfo=UTC)
    times[changed[2]] = dt.datetime(2026, 11, 10, 8, 30, tzinfo=UTC)
    for i in ids[-3:]:
        del rows[i]
    for j in range(4):
        rows[f"new-{j}"] = f"brand new text number {j}"
        times[f"new-{j}"] = dt.datetime(2026, 11, 21, tzinfo=UTC)
    write_with_times(tmp_path / "corpus", rows, times)

    code, st = cli_json(capsys, "status", "--config", str(config))
    s = st["staleness"]
    assert code == 1 and not st["ok"]
    assert (s["new"], s["changed"], s["deleted"], s["stale"]) == (4, 6, 3, 13)
    assert s["fraction"] == pytest.approx(13 / 204, abs=1e-6)
    assert s["oldest_stale_at"] == "2026-11-10T08:30:00+00:00" and s["oldest_stale_age_s"] > 0
    assert any("is stale: 13 rows" in p and "max_stale_fraction 0.05" in p for p in st["problems"])
    assert st["consistent"] is True  # stale is not broken

    # A candidate in another space shows up with its own fingerprint; a corrupt one fails consistency.
    v2 = Collection(cfg).migrate(ModelSpec(backend="hash", name="words", dims=32, seed=3)).version
    lenient = cfg.model_copy(update={"monitor": cfg.monitor.model_copy(update={"max_stale_fraction": 0.5})})
    st = Collection(lenient).status().to_dict()
    assert st["ok"] and st["candidate"]["id"] == v2
    assert {fp: e["versions"] for fp, e in st["fingerprints"].items()} == {
        st["active"]["fingerprint"]: {"active": v1},
        st["candidate"]["fingerprint"]: {"candidate": v2},
    }
    store = Store(cfg.store.uri)
    m = read_manifest(store, cfg.collection, v2)
    path = store.path(file_rel(m, m.shards[0].embeddings))
    with open(path, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00garbage\x00")
    st = Collection(lenient).status().to_dict()
    assert st["consistent"] is False and not st["ok"]
    assert st["verify"][v2]["ok"] is False and st["verify"][v1]["ok"] is True
    assert any(p.startswith(f"candidate {v2} fails verify: checksum mismatch") for p in st["problems"])


def test_status_without_updated_at_and_without_an_active_version(tmp_path):
    write_corpus(tmp_path / "corpus", files=1, rows=30)
    cfg = make_config(tmp_path)
    Registry(cfg).ensure_model()
    col = Collection(cfg)
    st = col.status().to_dict()
    assert st["active"] is None and st["staleness"] is None and not st["ok"]
    assert "has no active version" in st["problems"][0]
    col.backfill()
    st = col.status().to_dict()
    assert st["ok"] and st["staleness"]["oldest_stale_at"] is None  # the corpus has no updated_at column


def test_monitor_refreshes_when_stale_promotes_through_gates_and_logs_metrics(tmp_path, capsys, monkeypatch):
    rows = write_corpus(tmp_path / "corpus", files=2, rows=100)
    cfg = make_config(tmp_path, monitor={"max_stale_fraction": 0.02})
    v1 = Collection(cfg).backfill().version
    for i in sorted(rows)[:10]:
        rows[i] += " edited"
    write_rows(tmp_path / "corpus", rows, files=2)

    results = [r.to_dict() for r in Collection(cfg).monitor(interval_s=0, iterations=2, promote_if_gates_pass=True)]
    first, second = results
    assert first["staleness"]["changed"] == 10 and not first["ok"]
    v2 = first["action"]["refreshed"]
    assert v2 and first["action"]["promoted"] == v2 and first["action"]["refused"] is None
    assert Registry(cfg).aliases()[ACTIVE] == v2
    gates = json.loads(Registry(cfg).model_version(v2).tags["embray.gates"])
    assert [g["gate"] for g in gates] == ["verify", "recall_at_10"] and all(g["passed"] for g in gates)
    assert second["ok"] and second["active"]["id"] == v2 and second["staleness"]["stale"] == 0
    assert second["action"]["refreshed"] is None

    # One MLflow run holds the checks as a time series; the latest status is in the store for Serve.
    reg = Registry(cfg)
    (run,) = reg.client.search_runs([reg.experiment_id()], "tags.`embray.job` = 'monitor'")
    history = reg.client.get_metric_history(run.info.run_id, "staleness.fraction")
    assert [(h.step, h.value) for h in history] == [(0, pytest.approx(10 / 200)), (1, 0.0)]
    assert [h.value for h in reg.client.get_metric_history(run.info.run_id, "refreshed")] == [1.0, 0.0]
    assert run.info.status == "FINISHED"
    recorded = read_status(Store(cfg.store.uri), cfg.collection)
    assert recorded.active.id == v2 and recorded.staleness.fraction == 0.0
    assert v1 != v2

    # The Ray job entry point: one check, JSON on stdout.
    config = tmp_path / "embray.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    monkeypatch.setattr(sys, "argv", ["jobs/monitor.py", "--config", str(config), "--once", "--json"])
    runpy.run_path(str(REPO / "jobs" / "monitor.py"), run_name="__main__")
    (line,) = capsys.readouterr().out.splitlines()  # JSON Lines: one object per check
    only = json.loads(line)
    assert only["ok"] and only["active"]["id"] == v2


def test_monitor_records_a_refused_promotion_and_does_not_rebuild_it(tmp_path):
    from embray.lifecycle.versions import list_versions

    rows = write_corpus(tmp_path / "corpus", files=2, rows=200)
    # A starved HNSW graph: ANN recall stays below the floor, so the gate refuses what the monitor builds.
    cfg = make_config(
        tmp_path,
        index={"connectivity": 2, "expansion_add": 2, "expansion_search": 1, "shards": 1},
        monitor={"max_stale_fraction": 0.02, "recall_floor": 0.99},
    )
    v1 = Collection(cfg).backfill().version
    for i in sorted(rows)[:20]:
        rows[i] += " edited"
    write_rows(tmp_path / "corpus", rows, files=2)

    first, second = (
        r.to_dict() for r in Collection(cfg).monitor(interval_s=0, iterations=2, promote_if_gates_pass=True)
    )
    v2 = first["action"]["refreshed"]
    assert v2 and first["action"]["promoted"] is None
    assert "recall_at_10" in first["action"]["refused"] and "floor 0.99" in first["action"]["refused"]
    assert Registry(cfg).aliases()[ACTIVE] == v1
    assert second["action"]["refreshed"] is None and second["action"]["skipped"].startswith(f"{v2} is already")
    assert len(list_versions(Store(cfg.store.uri), cfg.collection)) == 2  # no second copy of v2
    reg = Registry(cfg)
    (run,) = reg.client.search_runs([reg.experiment_id()], "tags.`embray.job` = 'monitor'")
    assert [h.value for h in reg.client.get_metric_history(run.info.run_id, "promote_refused")] == [1.0, 0.0]


def test_updated_at_in_nanoseconds_or_another_zone_and_gc_of_killed_dry_runs(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=1, rows=40)
    ids = sorted(rows)
    ns = pa.array([1_763_000_000_123_456_789 + k for k in range(40)], pa.timestamp("ns", tz="America/New_York"))
    pq.write_table(
        pa.table({"id": ids, "text": [rows[i] for i in ids], "updated_at": ns}),
        tmp_path / "corpus" / "part-00000.parquet",
    )
    cfg = make_config(tmp_path)
    col = Collection(cfg)
    col.backfill()  # a build reads the column too: nanoseconds must not fail it
    texts = [rows[i] + (" changed" if k == 5 else "") for k, i in enumerate(ids)]
    pq.write_table(pa.table({"id": ids, "text": texts, "updated_at": ns}), tmp_path / "corpus" / "part-00000.parquet")
    st = col.status().to_dict()
    assert st["staleness"]["changed"] == 1
    expected = dt.datetime.fromtimestamp((1_763_000_000_123_456_789 + 5) // 1000 / 1e6, tz=UTC)
    assert st["staleness"]["oldest_stale_at"] == expected.isoformat(timespec="seconds")

    store = Store(cfg.store.uri)
    store.write_bytes("docs/_scratch/v20200101T000000000Z-0a0b0c/scan/x.parquet", b"left by a killed status")
    store.write_bytes(f"docs/_scratch/{'v' + dt.datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}000Z-0d0e0f/x", b"running")
    out = col.gc(keep=1)
    assert out.scratch == ["v20200101T000000000Z-0a0b0c"]
    assert store.listdir("docs/_scratch") == [n for n in store.listdir("docs/_scratch") if "0d0e0f" in n] != []
