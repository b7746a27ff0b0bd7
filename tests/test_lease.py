"""A writer that was paused past its lease (SIGSTOP: a GC pause, a stopped VM) and wakes up after another
writer took the lease over commits nothing: it stops with exit code 3 and one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embray import Collection
from embray.config import load_config
from embray.errors import ConflictError
from embray.lock import WRITER, Lease
from embray.store import Store
from embray.versions import list_version_dirs, list_versions

from .helpers import REPO, mutate, write_corpus, write_rows

pytestmark = pytest.mark.usefixtures("ray_local")

TTL = 3.0


def _config_file(tmp_path) -> Path:
    path = tmp_path / "embray.yaml"
    path.write_text(
        "collection: docs\n"
        "source: {uri: ./corpus}\n"
        f"store: {{uri: ./store, lease_ttl_s: {TTL}}}\n"
        "model: {backend: hash, name: words, dims: 64, latency_ms: 4.0}\n"  # about 0.2 s per chunk of 50
        "index: {shards: 3}\n"
        "embed: {batch_size: 50, keep_warm_s: 0}\n"
        "ray: {num_cpus: 2}\n"
    )
    return path


def _lease_pid(store_root: Path) -> int | None:
    try:
        return json.loads((store_root / "docs" / "_locks" / "writer.json").read_text()).get("pid")
    except (OSError, ValueError):
        return None


def test_a_writer_paused_past_its_lease_commits_nothing(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=3, rows=200)
    path = _config_file(tmp_path)
    col = Collection(load_config(str(path)))
    parent = col.backfill()
    changed, *_ = mutate(rows, n_insert=150, n_update=150, n_delete=20)
    write_rows(tmp_path / "corpus", changed, files=3)

    proc = subprocess.Popen(
        [sys.executable, "-m", "embray.cli", "refresh", "--config", str(path), "--json"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while _lease_pid(tmp_path / "store") != proc.pid:
            assert proc.poll() is None, f"the refresh ended before it held the lease: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the refresh never took the writer lease"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGSTOP)  # the driver: a paused holder (a GC pause, a stopped VM)
        time.sleep(TTL + 1.5)
        successor = col.refresh()  # takes the expired lease over and builds
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    assert proc.returncode == 3, (out, err[-3000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("embray: ") or "error" in ln.lower()]
    assert any("lost the writer lease" in ln and "nothing was committed" in ln for ln in lines), err[-3000:]
    store = Store(str(tmp_path / "store"))
    assert [m.version for m in list_versions(store, "docs")] == [parent.version, successor.version]
    assert list_version_dirs(store, "docs")[1] == []  # its unfinished directory was removed
    assert col.verify(successor.version).ok


def test_check_held_refuses_a_lease_taken_over_or_expired(tmp_path):
    store = Store(str(tmp_path / "store"))
    first = Lease(store, "docs", WRITER, job="refresh", ttl_s=TTL).acquire()
    first.check_held()  # held: nothing to say
    first._stop.set()  # it stops renewing, as a paused process would
    time.sleep(TTL + 0.5)
    with pytest.raises(ConflictError, match=r"lost the writer lease of docs: it expired, .* after its last renewal"):
        first.check_held()  # expired, though nobody has taken it yet
    first.release()  # still its record: removed

    second = Lease(store, "docs", WRITER, job="refresh", ttl_s=TTL).acquire()
    second._stop.set()
    time.sleep(TTL + 0.5)
    other = Lease(store, "docs", WRITER, job="gc", ttl_s=TTL).acquire()  # takes the expired lease over
    try:
        with pytest.raises(ConflictError, match=r"lost the writer lease of docs to gc run by .* paused past the lease"):
            second.check_held()
        second.release()  # not its record any more: left alone
        assert other.read()["token"] == other.token
        other.check_held()
    finally:
        other.release()


def test_a_store_hiccup_while_renewing_is_retried_not_a_lost_lease(tmp_path):
    from embray.errors import StoreError

    store = Store(str(tmp_path / "store"))
    lease = Lease(store, "docs", WRITER, job="refresh", ttl_s=TTL).acquire()
    real, failures = lease.read, []

    def flaky():
        if not failures:
            failures.append(1)
            raise StoreError("503 SlowDown")
        return real()

    try:
        lease.read = flaky  # the next renewal's read fails once
        time.sleep(TTL / 3 * 2 + 0.8)  # that tick, and a good one after it
        assert failures and lease.lost is None
        lease.read = real
        lease.check_held()
    finally:
        lease.release()
