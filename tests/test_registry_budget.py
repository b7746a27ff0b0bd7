"""MLflow's retries and timeout are per embray client (its config's `mlflow:`), not process-wide: a Serve
replica's short budget must not leak into a build in the same process, nor the other way round."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from embray.errors import RegistryError
from embray.lifecycle.registry import Registry

from .helpers import make_config


class _Unavailable(BaseHTTPRequestHandler):
    """An MLflow that answers every request 503 (a restart in progress), counting them."""

    count = 0

    def _answer(self):
        type(self).count += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def unavailable_mlflow():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _requests_for_one_call(tmp_path, url: str, retries: int) -> int:
    cfg = make_config(tmp_path, mlflow={"tracking_uri": url, "max_retries": retries, "backoff_s": 0, "timeout_s": 5})
    _Unavailable.count = 0
    with pytest.raises(RegistryError, match="MLflow at http://127.0.0.1"):
        Registry(cfg).experiment_id()
    return _Unavailable.count


def test_each_client_keeps_its_own_retry_budget(tmp_path, unavailable_mlflow):
    url = f"http://127.0.0.1:{unavailable_mlflow.server_address[1]}"
    env_before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP_REQUEST")}
    quick = _requests_for_one_call(tmp_path / "a", url, 1)
    patient = _requests_for_one_call(tmp_path / "b", url, 3)
    again = _requests_for_one_call(tmp_path / "c", url, 1)
    assert (quick, patient, again) == (2, 4, 2)  # the first try and its retries, nothing borrowed from another
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP_REQUEST")} == env_before


def test_two_clients_on_two_threads_at_once_keep_their_budgets(tmp_path, unavailable_mlflow):
    url = f"http://127.0.0.1:{unavailable_mlflow.server_address[1]}"
    regs = {
        r: Registry(make_config(tmp_path / str(r), mlflow={"tracking_uri": url, "max_retries": r, "backoff_s": 0}))
        for r in (0, 4)
    }
    _Unavailable.count = 0
    errors: list[Exception] = []

    def call(r: int):
        try:
            regs[r].experiment_id()
        except RegistryError as e:
            errors.append(e)

    threads = [threading.Thread(target=call, args=(r,)) for r in (0, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) == 2 and _Unavailable.count == 1 + 5  # 0 retries + 4 retries, each with its first try
