"""A Serve replica killed under load: requests in flight on it fail fast (an error status, never a hang past
the request timeout), the others go on, Serve starts a replacement that loads the active version, and every
answer names that one version."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from embray import Collection

from .helpers import free_port, make_config, write_corpus

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

TIMEOUT_S = 10.0  # serve.request_timeout_s here


def _replica_actors() -> list[str]:
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::loss#EmbrayServer#")
    ]


def test_a_replica_killed_under_load_is_replaced_and_no_request_hangs(tmp_path):
    import ray
    from ray import serve

    from embray.serving import application

    rows = write_corpus(tmp_path / "corpus", files=2, rows=150)
    port = free_port()
    cfg = make_config(
        tmp_path,
        collection="loss",
        serve={"port": port, "poll_s": 1.0, "num_cpus": 0.25, "replicas": 2, "request_timeout_s": TIMEOUT_S},
    )
    v1 = Collection(cfg).backfill().version
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": TIMEOUT_S})
    serve.run(application(cfg), name="loss", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    results: list[tuple[float, int, str | None, float]] = []  # (start, status, version, seconds)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def client(i: int) -> None:
        text = rows[f"doc-{i:06d}"]
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = requests.post(f"{url}/v1/collections/loss/search", json={"text": text, "k": 3}, timeout=60)
                status, version = r.status_code, (r.json().get("version") if r.status_code == 200 else None)
            except requests.RequestException:
                status, version = -1, None  # a dropped connection counts as failed fast if quick
            results.append((t0, status, version, time.monotonic() - t0))

    try:
        deadline = time.monotonic() + 120
        while len(_replica_actors()) < 2 or requests.get(f"{url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the two replicas never came up"
            time.sleep(0.5)
        before = set(_replica_actors())
        threads += [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(sorted(before)[0], namespace="serve"), no_restart=True)

        deadline = time.monotonic() + 180
        while True:  # Serve notices, starts a replacement, which loads the active version and warms up
            now = set(_replica_actors())
            if len(now) == 2 and now != before:
                running = serve.status().applications["loss"].deployments["EmbrayServer"].replica_states
                if running.get("RUNNING") == 2:
                    break
            assert time.monotonic() < deadline, f"no replacement replica: {now}"
            time.sleep(0.5)
        replaced_at = time.monotonic()
        time.sleep(5)  # traffic on the two replicas again
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
        serve.shutdown()

    failed = [r for r in results if r[1] != 200]
    print(
        f"{len(results)} requests, {len(failed)} failed {[r[1] for r in failed]}, "
        f"slowest {max(r[3] for r in results):.2f} s, "
        f"replaced in {replaced_at - killed_at:.1f} s"
    )
    assert results and all(not t.is_alive() for t in threads)
    assert max(s for *_, s in results) < TIMEOUT_S + 5, "a request hung past the request timeout"
    ok = [r for r in results if r[1] == 200]
    assert {v for _, _, v, _ in ok} == {v1}  # every answer from the one active version
    assert all(r[1] in (-1, 408, 500, 502, 503, 504) for r in failed), failed
    assert len(failed) <= 8, f"more than the requests in flight on the killed replica failed: {failed}"
    after = [r for r in results if r[0] > replaced_at]
    assert after and all(r[1] == 200 for r in after)  # the replacement answers
    during = [r for r in results if killed_at < r[0] < replaced_at]
    assert sum(r[1] == 200 for r in during) > 0  # the surviving replica kept answering meanwhile
