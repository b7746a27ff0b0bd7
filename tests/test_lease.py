"""A writer that was paused past its lease (SIGSTOP: a GC pause, a stopped VM) and wakes up after another
writer took the lease over commits nothing: it stops with exit code 3 and one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from embray import Collection
from embray.config import load_config
from embray.errors import ConflictError, StoreError
from embray.lifecycle.lock import WRITER, Lease
from embray.lifecycle.versions import list_version_dirs, list_versions
from embray.storage.store import Store

from .helpers import REPO, mutate, write_corpus, write_rows

pytestmark = pytest.mark.usefixtures("ray_local")

TTL = 3.0


def _config_file(tmp_path, store: str = "./store", options: dict | None = None) -> Path:
    path = tmp_path / "embray.yaml"
    path.write_text(
        "collection: docs\n"
        "source: {uri: ./corpus}\n"
        f"store: {{uri: {store}, lease_ttl_s: {TTL}, storage_options: {json.dumps(options or {})}}}\n"
        f"mlflow: {{tracking_uri: 'sqlite:///{tmp_path}/mlflow.db'}}\n"
        "model: {backend: hash, name: words, dims: 64, latency_ms: 4.0}\n"  # about 0.2 s per chunk of 50
        "index: {shards: 3}\n"
        "embed: {batch_size: 50, keep_warm_s: 0}\n"
        "ray: {num_cpus: 2}\n"
    )
    return path


def _lease_pid(store: Store) -> int | None:
    try:
        return json.loads(store.read_bytes("docs/_locks/writer.json")).get("pid")
    except (OSError, ValueError, StoreError):
        return None


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def writer_store(request, tmp_path):
    """(store URI, storage_options) of the collection: local disk, or a bucket on moto's S3 server."""
    if request.param == "local":
        return "./store", {}, Store(str(tmp_path / "store"))
    name, options, _ = request.getfixturevalue("bucket")
    return f"s3://{name}/store", options, Store(f"s3://{name}/store", options)


def test_a_writer_paused_past_its_lease_commits_nothing(tmp_path, writer_store):
    uri, options, store = writer_store
    rows = write_corpus(tmp_path / "corpus", files=3, rows=100)
    path = _config_file(tmp_path, uri, options)
    col = Collection(load_config(str(path)))
    # The parent is built under a lease of the usual length: with the test's 3 s, a renewal delayed by a loaded CI
    # machine lost the setup's own lease once (a ConflictError before the scenario began).
    cfg = col.config
    parent = Collection(cfg.model_copy(update={"store": cfg.store.model_copy(update={"lease_ttl_s": 60.0})})).backfill()
    changed, *_ = mutate(rows, n_insert=60, n_update=60, n_delete=10)
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
        while _lease_pid(store) != proc.pid:
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
    store = Store(str(tmp_path / "store"))
    lease = Lease(store, "docs", WRITER, job="refresh", ttl_s=TTL).acquire()
    real, failures = lease._state, []

    def flaky():
        if not failures:
            failures.append(1)
            raise StoreError("503 SlowDown")
        return real()

    try:
        lease._state = flaky  # the next renewal's read fails once
        time.sleep(TTL / 3 * 2 + 0.8)  # that tick, and a good one after it
        assert failures and lease.lost is None
        lease._state = real
        lease.check_held()
    finally:
        lease.release()


def _paused(lease: Lease) -> None:
    """Stop renewing, as a paused process does, until the lease has expired."""
    lease._stop.set()
    time.sleep(TTL + 0.5)


def test_a_commit_after_a_takeover_is_refused_even_right_after_a_good_check(tmp_path, monkeypatch):
    """No window between the last check and the commit: the holder passed its check, was paused right
    there, and another writer took over: the commit meets the takeover's fence and writes nothing."""
    store = Store(str(tmp_path / "store"))
    holder = Lease(store, "docs", WRITER, job="refresh", ttl_s=TTL).acquire()
    holder.check_held()
    _paused(holder)
    successor = Lease(store, "docs", WRITER, job="backfill", ttl_s=TTL).acquire()
    monkeypatch.setattr(holder, "check_held", lambda: None)  # it checked before the pause, and passed
    with pytest.raises(ConflictError, match=r"lost the writer lease of docs to backfill run by .*paused past"):
        holder.commit("docs/versions/v1/manifest.json", b"old holder")
    assert not store.exists("docs/versions/v1/manifest.json")
    assert not [n for n in store.listdir("docs/_locks/writer") if n.endswith(".pending")]
    holder.release()  # lost: touches nothing of the successor's
    successor.check_held()
    successor.commit("docs/versions/v2/manifest.json", b"successor")
    successor.release()
    assert store.read_bytes("docs/versions/v2/manifest.json") == b"successor"


def test_a_commit_decided_by_a_holder_that_then_crashed_is_finished_by_the_next_writer(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    holder = Lease(store, "docs", WRITER, job="refresh", ttl_s=TTL).acquire()
    monkeypatch.setattr(holder, "_finish", lambda end: None)  # it dies right after deciding the commit
    holder.commit("docs/versions/v1/manifest.json", b"decided")
    assert not store.exists("docs/versions/v1/manifest.json")
    _paused(holder)
    with Lease(store, "docs", WRITER, job="gc", ttl_s=TTL):  # the next writer finishes it first
        assert store.read_bytes("docs/versions/v1/manifest.json") == b"decided"
    assert not [n for n in store.listdir("docs/_locks/writer") if n.endswith(".pending")]


def test_writers_racing_for_an_expired_lease_one_wins(tmp_path):
    store = Store(str(tmp_path / "store"))
    _paused(Lease(store, "docs", WRITER, job="refresh", ttl_s=TTL).acquire())
    contenders = [Lease(store, "docs", WRITER, job=f"job{i}", ttl_s=TTL) for i in range(6)]
    outcomes: list[str] = []

    def race(lease: Lease) -> None:
        try:
            lease.acquire()
            outcomes.append(lease.job)
        except ConflictError:
            outcomes.append("busy")

    threads = [threading.Thread(target=race, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o != "busy"]
    assert len(winners) == 1 and len(outcomes) == 6
    (winner,) = [c for c in contenders if c.job == winners[0]]
    assert winner.generation == 2 and Lease(store, "docs", WRITER, job="x").read()["token"] == winner.token
    winner.release()
    with Lease(store, "docs", WRITER, job="next", ttl_s=TTL) as nxt:  # released: the next one takes it at once
        assert nxt.generation == 3


def test_create_only_accepts_its_own_bytes_already_there(tmp_path):
    """A create-only write whose first attempt landed (but was reported failed) is retried: same bytes
    mean it was ours; other bytes are a conflict."""
    store = Store(str(tmp_path / "store"))
    store.create_exclusive("docs/x.json", b"mine")
    store.create_exclusive("docs/x.json", b"mine")
    with pytest.raises(ConflictError, match="already exists"):
        store.create_exclusive("docs/x.json", b"theirs")
    assert store.read_bytes("docs/x.json") == b"mine"


def test_gc_retires_old_lease_generations_and_a_sleeper_cannot_commit_in_one(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    sleeper = Lease(store, "docs", WRITER, job="refresh", ttl_s=TTL).acquire()  # generation 1
    _paused(sleeper)
    for i in range(4):  # generations 2..5; the first takes the sleeper's over (fences generation 1)
        with Lease(store, "docs", WRITER, job=f"job{i}", ttl_s=TTL):
            pass
    with Lease(store, "docs", WRITER, job="gc", ttl_s=TTL) as gc:  # generation 6
        assert gc.prune() == 8  # the claims and ends of generations 1..4
        names = store.listdir("docs/_locks/writer")
        assert names == ["floor.000000000005", "g000000000005.end", "g000000000005.json", "g000000000006.json"]
        assert gc.prune() == 0  # nothing more to retire
    monkeypatch.setattr(sleeper, "check_held", lambda: None)  # it checked before its pause, and passed
    with pytest.raises(ConflictError, match=r"lost the writer lease of docs: .*retired"):
        sleeper.commit("docs/versions/v1/manifest.json", b"sleeper")  # its fence is gone, the floor is not
    assert not store.exists("docs/versions/v1/manifest.json")
    with Lease(store, "docs", WRITER, job="next", ttl_s=TTL) as nxt:
        assert nxt.generation == 7


def test_a_commit_decided_right_before_a_long_pause_stands(tmp_path, monkeypatch):
    """The holder decided its commit, then slept through a takeover (which finished the commit for it) and
    the retirement of its generation: it wakes to a committed version, not to an error that would make
    its build delete the files of a published version."""
    store = Store(str(tmp_path / "store"))
    holder = Lease(store, "docs", WRITER, job="refresh", ttl_s=TTL).acquire()  # generation 1
    real_floor = holder._floor

    def sleep_through_it_all() -> int:
        _paused(holder)
        for i in range(3):  # generations 2..4: the first finishes the holder's decided commit
            with Lease(store, "docs", WRITER, job=f"job{i}", ttl_s=TTL):
                pass
        with Lease(store, "docs", WRITER, job="gc", ttl_s=TTL) as gc:  # generation 5 retires 1..3
            assert gc.prune() > 0
        return real_floor()

    monkeypatch.setattr(holder, "_floor", sleep_through_it_all)
    holder.commit("docs/versions/v1/manifest.json", b"decided")
    assert holder.decided and store.read_bytes("docs/versions/v1/manifest.json") == b"decided"
