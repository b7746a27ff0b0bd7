"""The command line: JSON contracts, one-line errors and exit codes, and the Ray job entry point."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest

from embray.cli import main

from .helpers import REPO, make_config, mutate, write_corpus, write_rows


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
    assert built["rows"] == 80 and built["aliases"] == ["active"] and len(built["embed_nodes"]) == 1
    assert built["source_files"] == {"read": 2, "reused": 0}

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


@pytest.mark.usefixtures("ray_local")
def test_refresh_verify_promote_rollback_gc_commands(tmp_path, capsys):
    rows = write_corpus(tmp_path / "corpus", files=2, rows=40)
    config = _write_config(tmp_path)

    def cli_json(*args):
        main([*args, "--json"])
        return json.loads(capsys.readouterr().out)

    v1 = cli_json("backfill", "--config", config)["version"]
    write_rows(tmp_path / "corpus", mutate(rows, 3, 2, 1)[0], files=2)
    plan = cli_json("refresh", "--config", config, "--dry-run")
    assert {k: plan[k] for k in ("version", "parent", "new", "changed", "deleted", "embedded", "to_embed")} == {
        "version": None,
        "parent": v1,
        "new": 3,
        "changed": 2,
        "deleted": 1,
        "embedded": 0,
        "to_embed": 5,
    }
    out = cli_json("refresh", "--config", config)
    assert {"version", "parent", "new", "changed", "deleted", "reused", "embedded"} <= set(out)
    assert (out["parent"], out["embedded"], out["reused"], out["aliases"]) == (v1, 5, 77, [])
    assert len(out["embed_nodes"]) == 1
    v2 = out["version"]
    assert cli_json("verify", v2, "--config", config) == {"version": v2, "ok": True, "problems": []}
    out = cli_json("promote", v2, "--config", config, "--reason", "test")
    assert (out["active"], out["previous"], out["forced"]) == (v2, v1, False)
    assert [(g["gate"], g["passed"]) for g in out["gates"]] == [("verify", True), ("recall_at_10", True)]
    assert cli_json("rollback", "--config", config) == {"active": v1, "previous": v2}
    gone = cli_json("gc", "--config", config, "--keep", "1", "--dry-run")
    assert gone["deleted"] == [] and gone["dry_run"] is True  # v1 is active, v2 the newest

    # verify exits non-zero with the report on stdout, as JSON, when a file is damaged.
    manifest = json.loads((tmp_path / "store" / "docs" / "versions" / v2 / "manifest.json").read_text())
    emb = manifest["shards"][0]["embeddings"]  # (a delta refresh's base is its parent's file)
    part = tmp_path / "store" / "docs" / "versions" / (emb["version"] or v2) / emb["path"]
    part.write_bytes(part.read_bytes()[:-5])
    res = _run("verify", v2, "--config", config, "--json", cwd=tmp_path)
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert report["ok"] is False and "checksum mismatch" in report["problems"][0]
    res = _run("promote", v2, "--config", config, cwd=tmp_path)
    assert res.returncode == 4 and res.stderr.startswith("error: refusing to promote")  # GateError


def _run_in_a_terminal(args: list[str], cwd, timeout: float = 300, rc: int = 0) -> str:
    """Run the CLI with its stdout and stderr on a pseudo-terminal, as a person at a terminal would; its screen."""
    import pty
    import select
    import time

    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"COLUMNS": "120"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embray.cli", *args], cwd=cwd, stdin=follower, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process ended
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(leader)
    assert proc.returncode == rc, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_on_a_terminal_long_commands_show_progress_and_keep_the_log_lines_in_a_file(tmp_path):
    write_corpus(tmp_path / "corpus", files=3, rows=100)
    config = _write_config(tmp_path)
    screen = _run_in_a_terminal(["backfill", "--config", config], cwd=tmp_path)
    # what stays on screen: each line's text after its last carriage return (the pty ends lines with \r\n)
    lines = [ln.rstrip("\r").split("\r")[-1].replace("\x1b[K", "") for ln in screen.split("\n")]
    stages = [ln.split()[0] for ln in lines if ln.split() and ln.split()[0] in ("scan", "plan", "embed", "shards")]
    assert stages == ["scan", "plan", "embed", "shards"], screen
    embed = next(ln for ln in lines if ln.startswith("embed"))
    assert "300/300 texts" in embed and "100.0%" in embed and "texts/s" in embed
    assert any(ln.startswith("version v") and "committed: 300 rows" in ln for ln in lines)
    # none of Ray's, MLflow's or embray's log lines on the screen; they are in the log file it names
    assert "WARNING" not in screen and " INFO " not in screen and "Token authentication" not in screen
    log_line = next(ln for ln in lines if ln.startswith("log: "))
    log_file = log_line.split()[1]
    text = open(log_file).read()
    assert "INFO embray: committed" in text and "INFO mlflow" in text

    # an error still reaches the terminal, in one line
    (tmp_path / "corpus" / "part-00000.parquet").write_bytes(b"not parquet")
    failed = _run_in_a_terminal(["refresh", "--config", config], cwd=tmp_path, rc=1)
    assert "error: " in failed and "is not a readable Parquet file" in failed and "Traceback" not in failed
    write_corpus(tmp_path / "corpus", files=3, rows=100)

    # --json and --verbose stay as they were: JSON only on stdout, logs on stderr, no progress display
    verbose = _run_in_a_terminal(["--verbose", "refresh", "--config", config, "--dry-run"], cwd=tmp_path)
    assert " INFO embray:" in verbose and "log: " not in verbose and "\x1b[K" not in verbose
