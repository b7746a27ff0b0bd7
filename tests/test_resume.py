"""Crash safety: SIGKILL a running job (its driver, or an embedding worker), then rerun it.

The killed job must leave no visible version; the rerun must not embed again what the killed
one finished, and must produce the same content as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from embray import Collection
from embray.errors import EmbrayError
from embray.lifecycle.versions import list_version_dirs, list_versions
from embray.storage.store import Store

from .helpers import REPO, assert_same_content, content, make_config, mutate, write_corpus, write_rows

pytestmark = pytest.mark.usefixtures("ray_local")

ROWS, CHUNK = 1200, 50
SLOW = {"backend": "hash", "name": "words", "dims": 64, "latency_ms": 4.0}  # ~0.2 s per chunk of 50


def _config_file(tmp_path) -> Path:
    path = tmp_path / "embray.yaml"
    path.write_text(
        "collection: docs\n"
        "source: {uri: ./corpus}\n"
        "store: {uri: ./store}\n"
        "model: {backend: hash, name: words, dims: 64, latency_ms: 4.0}\n"
        "index: {shards: 3}\n"
        f"embed: {{batch_size: {CHUNK}}}\n"
        "ray: {num_cpus: 2}\n"
    )
    return path


def _cache_files(store_root: Path) -> list[Path]:
    return [p for p in (store_root / "docs" / "cache").rglob("*.parquet") if not p.name.startswith(".")]


def _cached_rows(store_root: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in _cache_files(store_root))


def _kill_mid_embedding(args: list[str], cwd: Path, store_root: Path, before: int) -> int:
    """Start ``embray ARGS`` in its own process group, SIGKILL the group once it has embedded a few
    chunks; returns how many cache chunks it had finished."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embray.cli", *args],
        cwd=cwd,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    try:
        while len(_cache_files(store_root)) < before + 4:
            assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
            assert time.monotonic() < deadline, "the job never started embedding"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, and the local Ray it started
        proc.wait(timeout=30)
    # Ray's processes notice their driver and raylet are gone and exit; one may finish the chunk it had.
    deadline = time.monotonic() + 60
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _session_pids(proc.pid), "processes of the killed job are still running"
    return len(_cache_files(store_root))


def _session_pids(sid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(p.name))
    return out


# A refresh killed mid-embedding resumes through the same cache (it was a second case here); the last test of
# this module kills a refresh later, after its delta segments are written and before its commit.
def test_sigkill_of_the_driver_then_rerun_resumes(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=4, rows=ROWS // 4)
    cfg = make_config(tmp_path, model=SLOW, embed={"batch_size": CHUNK})
    store = Store(cfg.store.uri)
    store_root = Path(cfg.store.uri)
    total = len(set(rows.values()))  # distinct texts: what a backfill sends to the model

    finished = _kill_mid_embedding(["backfill", "--config", str(_config_file(tmp_path))], tmp_path, store_root, 0)
    assert finished < total // CHUNK, "the kill came after embedding had finished"
    # Nothing partial is visible: no committed version, only an unfinished directory.
    assert list_versions(store, "docs") == []
    assert len(list_version_dirs(store, "docs")[1]) == 1
    done_before = _cached_rows(store_root)

    # The rerun (here in-process) takes over the dead driver's lease and embeds only what is left.
    result = Collection(cfg).backfill()
    assert 0 < done_before < total
    assert result.counts.embedded == total - done_before
    assert result.counts.cache_hits == done_before

    # The same content as an uninterrupted run on a fresh store.
    fresh = make_config(tmp_path, store={"uri": str(tmp_path / "fresh")}, model=SLOW | {"latency_ms": 0.0})
    assert_same_content(content(cfg, result.version), content(fresh, Collection(fresh).backfill().version))


def _embed_worker_pids() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"EmbedChunks" in cmd:
                pids.append(int(p.name))
    return pids


def test_sigkill_of_an_embedding_worker(tmp_path):
    write_corpus(tmp_path / "corpus", files=4, rows=ROWS // 4)
    cfg = make_config(tmp_path, model=SLOW, embed={"batch_size": CHUNK})
    store_root = Path(cfg.store.uri)
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = Collection(cfg).backfill()
        except EmbrayError as e:
            outcome["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 120
    while len(_cache_files(store_root)) < 4 or not _embed_worker_pids():
        assert t.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    for pid in _embed_worker_pids():
        os.kill(pid, signal.SIGKILL)
    t.join(timeout=300)
    assert not t.is_alive()
    fresh = make_config(tmp_path, store={"uri": str(tmp_path / "fresh")}, model=SLOW | {"latency_ms": 0.0})
    expected = content(fresh, Collection(fresh).backfill().version)
    if "error" in outcome:  # the job may give up; then nothing is visible and a rerun resumes
        assert list_versions(Store(cfg.store.uri), "docs") == []
        result = Collection(cfg).backfill()
        assert result.counts.embedded < ROWS
    else:  # or Ray restarts the actor and retries the chunk
        result = outcome["result"]
    assert_same_content(content(cfg, result.version), expected)


def test_a_delta_refresh_killed_after_its_segments_and_before_its_commit(tmp_path):
    """SIGKILL between writing the delta segments and committing: nothing visible; the rerun writes the same
    rows (embedding nothing again) and gc removes what the killed one wrote."""
    rows = write_corpus(tmp_path / "corpus", files=2, rows=300)
    cfg = make_config(tmp_path, model=SLOW, embed={"batch_size": CHUNK})  # as _config_file
    store, store_root = Store(cfg.store.uri), Path(cfg.store.uri)
    v1 = Collection(cfg).backfill()
    changed = mutate(rows, n_insert=6, n_update=6, n_delete=3)[0]
    write_rows(tmp_path / "corpus", changed, files=2)
    marker = tmp_path / "shards-written"
    driver = (
        "import pathlib, time\n"
        "from embray.pipeline import run\n"
        "def hold(self, *args, **kwargs):\n"
        f"    pathlib.Path({str(marker)!r}).write_text('')\n"
        "    time.sleep(600)\n"
        "run.Build.commit = hold  # stop right before the manifest is written\n"
        "from embray.cli import main\n"
        f"main(['refresh', '--config', {str(_config_file(tmp_path))!r}])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", driver], cwd=tmp_path, env=env, start_new_session=True, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    try:
        while not marker.exists():
            assert proc.poll() is None, f"the refresh ended before its commit: {proc.stderr.read()[-2000:]!r}"
            assert time.monotonic() < deadline, "the refresh never reached its commit"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    committed, unfinished = list_version_dirs(store, "docs")
    assert committed == [v1.version] and len(unfinished) == 1
    assert list((store_root / "docs" / "versions" / unfinished[0]).rglob("*seg001*")), "no segment was written"

    result = Collection(cfg).refresh()  # takes over the dead driver's lease
    assert result.manifest.counts["shards_delta"] >= 1 and result.counts.embedded == 0  # the cache has the 12
    assert result.counts.cache_hits == 12 and Collection(cfg).verify(result.version).problems == []
    fresh = make_config(tmp_path, store={"uri": str(tmp_path / "fresh")}, model=SLOW)
    assert_same_content(content(cfg, result.version), content(fresh, Collection(fresh).backfill().version))
    assert Collection(cfg).gc(keep=5).unfinished == unfinished
    assert list_version_dirs(store, "docs") == ([v1.version, result.version], [])
