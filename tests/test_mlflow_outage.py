"""A restarting or unreachable MLflow tracking server (a real `mlflow server` process on loopback): builds
finish their records or leave a committed version the next command registers once; alias moves fail
clearly and change nothing; Serve keeps answering and reports the outage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from embray import Collection
from embray.errors import RegistryError
from embray.lifecycle.registry import VERSION_TAG
from embray.lifecycle.versions import list_versions
from embray.storage.store import Store

from .helpers import free_port, make_config, wait_for, write_corpus

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

BIN = Path(sys.executable).parent


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend that survives restarts."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90) -> None:
        log = open(self.root / "mlflow-server.log", "ab")  # noqa: SIM115 - the server's, closed with it
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root}/mlflow.db",
                "--artifacts-destination",
                f"{self.root}/artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "mlflow-server.log").read_text()[-3000:]
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise AssertionError(f"mlflow server did not start; see {self.root}/mlflow-server.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def _module_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))  # one per module: it takes ~12 s to start
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(_module_server):
    """The module's MLflow server, running (a test may stop it; each test uses a collection of its own)."""
    if _module_server.proc is None or _module_server.proc.poll() is not None:
        _module_server.start()
    return _module_server


def _config(tmp_path, server: MlflowServer, collection: str = "docs", **mlflow):
    return make_config(
        tmp_path,
        collection=collection,
        mlflow={"tracking_uri": server.url, **mlflow},
        model={"backend": "hash", "name": "words", "dims": 64, "latency_ms": 3.0},  # about 4 s of embedding
        embed={"batch_size": 100, "keep_warm_s": 0},
    )


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _when_embedding(tmp_path, collection: str = "docs") -> None:
    """Wait until the build is embedding (its MLflow run and plan are done; the commit is ahead)."""
    cache = tmp_path / "store" / collection / "cache"
    deadline = time.monotonic() + 120
    while not (cache.exists() and any(p.is_file() for p in cache.rglob("*.parquet"))):
        assert time.monotonic() < deadline, "the build never started embedding"
        time.sleep(0.05)


def _client(server: MlflowServer):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def _model_versions(server: MlflowServer, version: str, collection: str = "docs") -> list:
    mvs = _client(server).search_model_versions(f"name='embray.{collection}'")
    return [mv for mv in mvs if mv.tags.get(VERSION_TAG) == version]


def _active(server: MlflowServer, collection: str = "docs") -> str:
    return str(_client(server).get_model_version_by_alias(f"embray.{collection}", "active").version)


def test_a_build_rides_out_a_short_mlflow_restart(tmp_path, mlflow_server):
    write_corpus(tmp_path / "corpus", files=3, rows=400)
    col = Collection(_config(tmp_path, mlflow_server))
    thread, out = _in_thread(col.backfill)
    _when_embedding(tmp_path)
    mlflow_server.stop()  # a deploy restarts the tracking server under the running build
    time.sleep(2)
    mlflow_server.start()
    thread.join(timeout=300)
    assert "error" not in out, out.get("error")
    result = out["result"]
    (mv,) = _model_versions(mlflow_server, result.version)  # registered once
    assert str(mv.version) == result.model_version == _active(mlflow_server)
    assert _client(mlflow_server).get_run(mv.run_id).info.status == "FINISHED"


def test_an_outage_past_the_retries_leaves_a_committed_version_registered_once_later(tmp_path, mlflow_server):
    write_corpus(tmp_path / "corpus", files=3, rows=400)
    cfg = _config(tmp_path, mlflow_server, "late", max_retries=1, backoff_s=0, timeout_s=5)
    col = Collection(cfg)
    thread, out = _in_thread(col.backfill)
    _when_embedding(tmp_path, "late")
    mlflow_server.stop()  # and it stays down past the build
    thread.join(timeout=300)
    err = out.get("error")
    assert isinstance(err, RegistryError), err
    (manifest,) = list_versions(Store(cfg.store.uri), "late")
    assert f"version {manifest.version} was committed" in str(err) and "next embray command" in str(err)

    # Alias moves during the outage fail with one clear error, soon, and change nothing.
    for move in (lambda: col.promote(manifest.version, reason="deploy"), lambda: col.rollback(reason="undo")):
        t0 = time.monotonic()
        with pytest.raises(RegistryError, match=r"MLflow at http://127\.0\.0\.1:\d+ failed .*the server is up"):
            move()
        assert time.monotonic() - t0 < 30

    mlflow_server.start()
    assert _model_versions(mlflow_server, manifest.version, "late") == []  # nothing was registered meanwhile
    promoted = col.promote(manifest.version, reason="after the outage")  # registers it first, then moves active
    assert promoted.active == manifest.version and promoted.previous is None
    (mv,) = _model_versions(mlflow_server, manifest.version, "late")
    assert str(mv.version) == _active(mlflow_server, "late")
    client = _client(mlflow_server)
    run = client.get_run(manifest.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["embray.recorded_late"] == "true"

    # A create the server applied twice (its reply lost, the client retried): the next command keeps one,
    # the one the alias names.
    client.create_model_version("embray.late", source=mv.source, run_id=mv.run_id, tags={VERSION_TAG: manifest.version})
    assert len(_model_versions(mlflow_server, manifest.version, "late")) == 2
    col.promote(manifest.version, reason="again")
    (kept,) = _model_versions(mlflow_server, manifest.version, "late")
    assert kept.version == mv.version and col.aliases()["active"] == manifest.version


def test_serve_keeps_answering_while_mlflow_is_down(tmp_path, mlflow_server):
    import ray
    from ray import serve

    from embray.serving import application

    rows = write_corpus(tmp_path / "corpus", files=2, rows=100)
    port = free_port()
    cfg = make_config(
        tmp_path,
        collection="outage",  # its own gauges: another module's replica may still be on Ray's endpoint
        mlflow={"tracking_uri": mlflow_server.url},
        serve={"port": port, "poll_s": 1.0, "num_cpus": 0.5},
    )
    v1 = Collection(cfg).backfill().version
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(cfg), name="outage", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    metrics_url = f"http://127.0.0.1:{ray._private.worker.global_worker.node.metrics_export_port}/metrics"

    def mlflow_up() -> float | None:
        for ln in requests.get(metrics_url, timeout=10).text.splitlines():
            if ln.startswith("ray_embray_mlflow_up{") and 'collection="outage"' in ln:
                return float(ln.rsplit(" ", 1)[1])
        return None

    def search():
        return requests.post(
            f"{url}/v1/collections/outage/search", json={"text": rows["doc-000007"], "k": 3}, timeout=30
        )

    try:
        wait_for("ready", lambda: requests.get(f"{url}/readyz", timeout=5).status_code == 200)
        assert requests.get(f"{url}/readyz", timeout=5).json()["mlflow"] == {"ok": True}
        wait_for("embray_mlflow_up 1", lambda: mlflow_up() == 1.0)

        mlflow_server.stop()
        down = wait_for(
            "the outage in /readyz",
            lambda: (r := requests.get(f"{url}/readyz", timeout=5).json())["mlflow"]["ok"] is False and r,
        )
        assert down["ready"] is True and down["version"] == v1 and "MLflow at" in down["mlflow"]["error"]
        assert down["mlflow"]["since"]
        for _ in range(5):  # answers go on from the loaded version
            r = search()
            assert r.status_code == 200 and r.json()["version"] == v1 and r.json()["results"][0]["id"] == "doc-000007"
        wait_for("embray_mlflow_up 0", lambda: mlflow_up() == 0.0)

        mlflow_server.start()
        wait_for("MLflow back in /readyz", lambda: requests.get(f"{url}/readyz", timeout=5).json()["mlflow"]["ok"])
        assert search().status_code == 200
    finally:
        serve.shutdown()
