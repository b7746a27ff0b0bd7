"""The command line: JSON contracts, one-line errors and exit codes, and the Ray job entry point."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest

from embray.cli import main

from .conftest import REPO, make_config, write_corpus


def _write_config(tmp_path) -> str:
    path = tmp_path / "embray.yaml"
    path.write_text(
        "collection: docs\n"
        "source: {uri: ./corpus}\n"
        "store: {uri: ./store}\n"
        "model: {backend: hash, name: words, dims: 64}\n"
        "index: {shards: 2}\n"
        "embed: {batch_size: 100}\n"
    )
    return str(path)


def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "embray.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.mark.usefixtures("ray_local")
def test_job_entry_point_then_versions_and_search_print_only_json(tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", files=2, rows=40)
    config = _write_config(tmp_path)
    monkeypatch.setattr(sys, "argv", ["jobs/backfill.py", "--config", config, "--json"])
    runpy.run_path(str(REPO / "jobs" / "backfill.py"), run_name="__main__")  # what `ray job submit` runs
    built = json.loads(capsys.readouterr().out)
    assert built["rows"] == 80 and built["aliases"] == ["active"]

    out = _run("versions", "--config", config, "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (v,) = json.loads(out.stdout)
    assert {"id", "model", "fingerprint", "rows", "created", "aliases"} <= set(v)
    assert (v["id"], v["rows"], v["aliases"], v["model"]) == (built["version"], 80, ["active"], "hash:words")

    out = _run("search", "--config", config, corpus["doc-000007"], "-k", "3", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert (res["version"], res["fingerprint"]) == (built["version"], built["fingerprint"])
    assert len(res["results"]) == 3 and res["results"][0]["id"] == "doc-000007"
    assert set(res["results"][0]) == {"id", "score"}

    human = _run("versions", "--config", config, cwd=tmp_path)
    assert built["version"] in human.stdout and "active" in human.stdout


def test_errors_are_one_line_with_an_exit_code(tmp_path):
    out = _run("versions", "--config", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: config file {tmp_path / 'missing.yaml'} does not exist; pass --config with the path of your YAML file"
    ]
    config = _write_config(tmp_path)
    out = _run("search", "--config", config, "anything", "--json", cwd=tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    assert "has no 'active' version yet" in out.stderr
    out = _run("search", "--config", config, "x", "-k", "0", cwd=tmp_path)
    assert out.returncode == 2 and "Invalid value for '-k'" in out.stderr


def test_versions_on_an_empty_collection(tmp_path, capsys):
    make_config(tmp_path)
    main(["versions", "--config", _write_config(tmp_path), "--json"])
    assert json.loads(capsys.readouterr().out) == []
