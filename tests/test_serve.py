"""The Serve application over real HTTP on loopback, on the session's local Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import requests

from embray import Collection
from embray.errors import ConfigError, VersionError
from embray.models import ModelSpec, fingerprint, load_embedder

from .helpers import (
    REPO,
    TENANTS,
    add_columns,
    free_port,
    make_config,
    mutate,
    row_number,
    wait_for,
    write_corpus,
    write_rows,
)

pytestmark = pytest.mark.usefixtures("ray_local")

TOKEN = "s3cret-admin"


def _wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or still starting
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never became ready")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ray import serve

    from embray.serving import application

    tmp = tmp_path_factory.mktemp("serve")
    rows = write_corpus(tmp / "corpus", files=2, rows=150)
    add_columns(tmp / "corpus")
    port = free_port()
    cfg = make_config(
        tmp,
        serve={"port": port, "poll_s": 1.0, "admin_token": TOKEN, "max_text_chars": 500, "num_cpus": 0.5},
        index={"max_delta_fraction": 0.3, "keywords": True},  # v2: v1's bases, a delta segment, tombstones per shard
        source={"columns": ["tenant", "n"], "store_text": True},
    )
    col = Collection(cfg)
    v1 = col.backfill().version
    changed, inserted, *_ = mutate(rows, 20, 20, 10)
    write_rows(tmp / "corpus", changed, files=2)
    add_columns(tmp / "corpus")
    refreshed = col.refresh()
    v2 = refreshed.version
    assert refreshed.manifest.counts["shards_delta"] == 3
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(cfg), name="embray", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url)
    yield {"cfg": cfg, "url": url, "v1": v1, "v2": v2, "rows": rows, "changed": changed, "inserted": inserted}
    serve.shutdown()


def _info(url: str) -> dict:
    return requests.get(f"{url}/v1/collections/docs", timeout=10).json()


def _search(url, body, **kw):
    return requests.post(f"{url}/v1/collections/docs/search", json=body, timeout=30, **kw)


def test_text_and_vector_search_name_their_version(served):
    url, cfg, rows = served["url"], served["cfg"], served["rows"]
    r = _search(url, {"text": rows["doc-000042"], "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == served["v1"] and body["fingerprint"] == fingerprint(cfg.model)
    assert body["results"][0]["id"] == "doc-000042" and len(body["results"]) == 5
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)

    vec = load_embedder(cfg.model).embed_queries([rows["doc-000042"]])[0].tolist()
    r = _search(url, {"vector": vec, "fingerprint": fingerprint(cfg.model), "k": 5})
    assert r.status_code == 200 and [h["id"] for h in r.json()["results"]] == [h["id"] for h in body["results"]]

    info = requests.get(f"{url}/v1/collections/docs", timeout=10).json()
    assert info["version"] == served["v1"] and info["rows"] == 300 and info["model"] == "hash:words"
    assert info["loaded_at"] and info["fingerprint"] == fingerprint(cfg.model)
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"ok": True}
    api = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/v1/collections/{name}/search", "/v1/collections/{name}", "/readyz"} <= set(api["paths"])


def test_a_vector_from_another_space_is_refused(served):
    other = ModelSpec(backend="hash", name="words", dims=64, seed=7)
    vec = load_embedder(other).embed_queries(["river"])[0].tolist()
    r = _search(served["url"], {"vector": vec, "fingerprint": fingerprint(other)})
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert fingerprint(other) in detail and fingerprint(served["cfg"].model) in detail


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"text": "river", "k": 0}, 422, "greater than or equal to 1"),
        ({"text": "river", "k": 1001}, 422, "less than or equal to 1000"),
        ({"text": "x" * 501}, 413, "limit is 500"),
        ({"text": "   "}, 422, "empty"),
        ({}, 422, "exactly one of"),
        ({"text": "a", "vector": [0.0] * 64, "fingerprint": "f"}, 422, "exactly one of"),
        ({"vector": [0.1] * 64}, 422, "must name the `fingerprint`"),
        ({"vector": [0.1] * 3, "fingerprint": "FP"}, 422, "3 dimensions"),
        ({"vector": [0.1] * 64, "fingerprint": "FP"}, 409, "space"),
        ({"text": 5}, 422, "string"),
    ],
)
def test_bad_requests_get_a_clear_4xx(served, body, status, needle):
    fp = fingerprint(served["cfg"].model)
    body = json.loads(json.dumps(body).replace('"FP"', json.dumps(fp)))
    if body.get("fingerprint") == fp and status == 409:
        body["fingerprint"] = "0" * 24
    r = _search(served["url"], body)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_non_finite_vectors_unknown_collections_and_garbage_do_not_hurt_the_server(served):
    url, fp = served["url"], fingerprint(served["cfg"].model)
    raw = '{"vector": [NaN' + ", 0.1" * 63 + '], "fingerprint": "' + fp + '"}'
    r = requests.post(
        f"{url}/v1/collections/docs/search", data=raw, timeout=10, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "NaN" in r.text
    assert requests.post(f"{url}/v1/collections/nope/search", json={"text": "a"}, timeout=10).status_code == 404
    r = requests.post(
        f"{url}/v1/collections/docs/search",
        data=b"\xff{not json",
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400  # not even JSON
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200


def test_prometheus_metrics_name_the_served_version(served):
    """The replica's metrics reach Ray's Prometheus endpoint (names get Ray's `ray_` prefix)."""
    import ray

    url, v1 = served["url"], served["v1"]
    col = Collection(served["cfg"])
    st = col.status(verify=False)  # what the monitor records; the replicas export it
    col.record_status(st)
    for _ in range(3):
        assert _search(url, {"text": "river mountain", "k": 2}).status_code == 200
    assert _search(url, {"text": "river", "k": 0}).status_code == 422
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + 60
    lines: list[str] = []
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_embray_")]
        if all(
            any(ln.startswith(name) and needle in ln for ln in lines)
            for name, needle in [
                ("ray_embray_requests_total", 'outcome="ok"'),
                ("ray_embray_active_version", v1),
                ("ray_embray_staleness_fraction", "docs"),
                ("ray_embray_stale_rows", "new"),
                ("ray_embray_active_segments", "dead_rows"),
            ]
        ):
            break
        time.sleep(1)
    ok = [ln for ln in lines if ln.startswith("ray_embray_requests_total") and 'outcome="ok"' in ln]
    assert any(f'version="{v1}"' in ln and 'endpoint="text"' in ln for ln in ok), lines[:20]
    active = [ln for ln in lines if ln.startswith("ray_embray_active_version") and f'version="{v1}"' in ln]
    assert active and float(active[0].rsplit(" ", 1)[1]) == 1.0
    assert any(ln.startswith("ray_embray_request_latency_ms_bucket") for ln in lines)

    def gauge(name: str, needle: str) -> float:
        (line,) = [ln for ln in lines if ln.startswith(name + "{") and needle in ln and 'collection="docs"' in ln]
        return float(line.rsplit(" ", 1)[1])

    s = st.to_dict()["staleness"]  # the fixture changed the corpus after v1: 20 new, 20 changed, 10 deleted
    assert (s["new"], s["changed"], s["deleted"]) == (20, 20, 10)
    assert gauge("ray_embray_staleness_fraction", 'collection="docs"') == pytest.approx(s["fraction"])
    assert gauge("ray_embray_stale_rows", 'kind="changed"') == 20.0
    assert gauge("ray_embray_status_ok", "docs") == 0.0  # 50 stale rows of 320 is over the 5% threshold
    assert 0 <= gauge("ray_embray_status_age_seconds", "docs") < 120
    a = st.to_dict()["active"]
    assert gauge("ray_embray_active_segments", 'kind="segments"') == a["segments"]
    assert gauge("ray_embray_active_segments", 'kind="dead_rows"') == a["dead_rows"]


def test_status_compares_what_is_served_with_the_alias(served, tmp_path):
    url, cfg, v1 = served["url"], served["cfg"], served["v1"]
    here = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"url": url})})
    st = Collection(here).status(verify=False, staleness=False).to_dict()
    assert st["served"] == v1 and st["served_matches"] is True and st["problems"] == []

    # Another store whose collection is also called docs: its alias names another version.
    write_corpus(tmp_path / "corpus", files=1, rows=20)
    other = make_config(tmp_path, serve={"url": url})
    v_other = Collection(other).backfill().version
    st = Collection(other).status(verify=False, staleness=False).to_dict()
    assert st["served"] == v1 and st["served_matches"] is False and not st["ok"]
    assert f"serves {v1} but alias active is {v_other}" in st["problems"][0]

    gone = other.model_copy(update={"serve": other.serve.model_copy(update={"url": f"http://127.0.0.1:{free_port()}"})})
    st = Collection(gone).status(verify=False, staleness=False).to_dict()
    assert st["served"] is None and not st["ok"] and "unreachable" in st["problems"][0]


def test_reload_needs_the_admin_token(served):
    url = served["url"]
    assert requests.post(f"{url}/v1/collections/docs/reload", timeout=10).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert requests.post(f"{url}/v1/collections/docs/reload", headers=bad, timeout=10).status_code == 401
    good = {"Authorization": f"Bearer {TOKEN}"}
    r = requests.post(f"{url}/v1/collections/docs/reload", headers=good, timeout=30)
    assert r.status_code == 200 and r.json()["version"] == served["v1"]


def test_cutover_under_load_through_a_promotion_and_a_rollback(served):
    url, cfg, v1, v2 = served["url"], served["cfg"], served["v1"], served["v2"]
    new_id = sorted(served["inserted"])[0]
    query = served["changed"][new_id]
    log: list[tuple[float, float, int, str | None]] = []
    stop = threading.Event()

    def client():
        with requests.Session() as s:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = s.post(f"{url}/v1/collections/docs/search", json={"text": query, "k": 3}, timeout=30)
                    log.append((t0, time.monotonic(), r.status_code, r.json().get("version")))
                except requests.RequestException as e:
                    log.append((t0, time.monotonic(), 0, repr(e)))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    reload = {"Authorization": f"Bearer {TOKEN}"}
    try:
        time.sleep(1.0)
        Collection(cfg).promote(v2, reason="cutover test")
        r = requests.post(f"{url}/v1/collections/docs/reload", headers=reload, timeout=60)
        t_v2 = time.monotonic()
        assert r.json()["version"] == v2
        time.sleep(1.5)
        t_rollback = time.monotonic()
        Collection(cfg).rollback(reason="cutover test")
        r = requests.post(f"{url}/v1/collections/docs/reload", headers=reload, timeout=60)
        t_v1 = time.monotonic()
        assert r.json()["version"] == v1
        time.sleep(1.0)
        # And without a reload call: the poller picks up a promotion within poll_s (plus loading).
        t_promote_call = time.monotonic()  # the poller may switch while promote() is still writing its tags
        Collection(cfg).promote(v2, reason="poll test")
        t_promoted = time.monotonic()
        deadline = t_promoted + 30
        while time.monotonic() < deadline and not any(t0 > t_promoted and v == v2 for t0, _, _, v in log[-20:]):
            time.sleep(0.2)
        t_polled = time.monotonic()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = [e for e in log if e[2] != 200]
    assert not failed, failed[:5]
    assert len(log) > 50
    # After each switch returned, no answer started later came from the version no longer active.
    assert all(v == v2 for t0, _, _, v in log if t_v2 < t0 < t_rollback)
    assert all(v == v1 for t0, _, _, v in log if t_v1 < t0 < t_promote_call)
    assert t_polled - t_promoted < 10, "the poller did not switch to the promoted version"
    assert all(v == v2 for t0, _, _, v in log if t0 > t_polled)
    # The new version answers with the row only it has (from its delta segment), never with one it deleted or
    # with an updated row's old text (tombstoned in its parent's base).
    r = _search(url, {"text": query, "k": 1})
    assert r.json()["version"] == v2 and r.json()["results"][0]["id"] == new_id
    rows, changed = served["rows"], served["changed"]
    deleted = sorted(set(rows) - set(changed))[:3]
    updated = sorted(i for i in changed if i in rows and changed[i] != rows[i])[:3]
    for i in deleted + updated:  # an updated row answers once (its segment row), not also as its old base row
        r = _search(url, {"text": rows[i], "k": 20})
        ids = [h["id"] for h in r.json()["results"]]
        assert r.json()["version"] == v2 and len(ids) == 20 and len(set(ids)) == 20, ids
        assert i not in deleted or i not in ids, (i, ids)
    Collection(cfg).rollback()  # leave v1 active for any later test


def _embray_serve(tmp_path, cfg_path, port: int, *args: str, env: dict | None = None, log: str = "serve.log"):
    """A real `embray serve` process in a session of its own; its stdout and stderr go to ``tmp_path / log``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    env.pop("EMBRAY_ADMIN_TOKEN", None)
    with open(tmp_path / log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "embray.cli", "serve", "--config", str(cfg_path), "--port", str(port), *args],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


def _stopped(proc, sig: int, within: float) -> float:
    """Send ``sig`` and wait for the process to exit; returns how long it took (it must exit within ``within``)."""
    proc.send_signal(sig)
    t = time.monotonic()
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"`embray serve` still runs {within:g}s after {signal.Signals(sig).name}") from None
    return time.monotonic() - t


def _readyz(url: str, *, starting: bool = False) -> dict | None:
    """GET /readyz, which must answer within 2 s whenever the port accepts (``starting``: or be still starting):
    its status and body (None: nothing listens yet, or any more)."""
    try:
        r = requests.get(f"{url}/readyz", timeout=2)
    except requests.ConnectionError:
        return None
    except requests.Timeout:
        if starting:  # the moment between Serve's proxy taking the port and the embray-readyz replica running
            return None
        raise AssertionError(f"{url}/readyz accepted the connection but did not answer within 2 s") from None
    return {"status": r.status_code, **(r.json() if r.headers.get("content-type") == "application/json" else {})}


def _yaml_config(tmp_path, **extra: str) -> object:
    """The embray.yaml of a 40-row hash collection (built), with ``extra`` top-level sections (YAML flow text)."""
    write_corpus(tmp_path / "corpus", files=1, rows=40)
    Collection(make_config(tmp_path, model={"dims": 32}, index={"shards": 2})).backfill()
    cfg_path = tmp_path / "embray.yaml"
    cfg_path.write_text(
        "collection: docs\nsource: {uri: ./corpus}\nstore: {uri: ./store}\n"
        "model: {backend: hash, name: words, dims: 32}\nindex: {shards: 2}\n"
        + "".join(f"{k}: {v}\n" for k, v in extra.items())
    )
    return cfg_path


@pytest.mark.parametrize(
    ("ingress", "sig", "code"),
    [("default", signal.SIGINT, 130), ("haproxy", signal.SIGTERM, 143)],
    ids=["default-SIGINT", "haproxy-SIGTERM"],
)
def test_embray_serve_command_answers_and_stops_on_ctrl_c(tmp_path, ingress, sig, code):
    cfg_path = _yaml_config(tmp_path, ray="{num_cpus: 2}")
    port = free_port()
    proc = _embray_serve(tmp_path, cfg_path, port, *(["--haproxy"] if ingress == "haproxy" else []))
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, timeout=180)
        r = requests.post(f"{url}/v1/collections/docs/search", json={"text": "river", "k": 2}, timeout=30)
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        # No admin token configured anywhere: reload is refused outright.
        r = requests.post(f"{url}/v1/collections/docs/reload", headers={"Authorization": "Bearer x"}, timeout=10)
        assert r.status_code == 403 and "admin_token" in r.text
        assert _readyz(url)["status"] == 200
        took = _stopped(proc, sig, within=20)
        log = (tmp_path / "serve.log").read_text()
        assert proc.returncode == code, log[-3000:]
        assert "stopped" in log and took < 20
        assert _readyz(url) is None  # Serve's proxy is gone with it
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_embray_serve_refuses_what_its_local_ray_cannot_place(tmp_path):
    """The issue's case: two shard groups with the default reservations on a 2-CPU local Ray."""
    cfg_path = tmp_path / "embray.yaml"
    cfg_path.write_text(
        "collection: docs\nsource: {uri: ./corpus}\nstore: {uri: ./store}\n"
        "model: {backend: hash, name: words, dims: 32}\nray: {num_cpus: 2}\nserve: {shard_groups: 2}\n"
    )
    t = time.monotonic()
    proc = _embray_serve(tmp_path, cfg_path, free_port())
    try:
        assert proc.wait(timeout=60) == 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - t < 60
    log = (tmp_path / "serve.log").read_text()
    assert (
        "error: cannot serve 'docs': the application needs 3 CPUs (ingress 1 + 2 shard groups x 1); this Ray has 2: "
        "lower serve.num_cpus / serve.group_num_cpus or raise ray.num_cpus" in log
    ), log[-3000:]


@pytest.fixture
def small_cluster(tmp_path):
    """A Ray of 2 CPUs started with `ray start` (a cluster to `embray serve`: one it may wait on for nodes), in
    a temp dir and a session of its own, stopped by its process group; yields (address, environment)."""
    import secrets
    import shutil

    from .cluster import BIN, _agent_ports, _kill_naming, _stop_group, new_root

    temp = Path(new_root())  # short: Ray's socket paths must stay under ~100 characters
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    port = free_port()
    with open(tmp_path / "ray-head.log", "w") as out:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1"]
            + ["--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp}"]
            + ["--disable-usage-stats", f"--ray-client-server-port={free_port()}", *_agent_ports()],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started = lambda: "will now block forever" in (tmp_path / "ray-head.log").read_text()  # noqa: E731
        wait_for("the Ray head", started, timeout=90)
        yield f"127.0.0.1:{port}", env
    finally:
        _stop_group(head.pid)
        _kill_naming(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def test_embray_serve_on_a_cluster_waits_for_nodes_answers_readyz_and_stops_on_ctrl_c(tmp_path, small_cluster):
    """On a cluster that cannot hold the replicas yet `embray serve` deploys (an autoscaler would see the demand),
    says what it waits for, answers /readyz within 2 s (503 with the reason), and stops on the first Ctrl-C; with
    a short serve.placement_timeout_s it gives up, naming the shortfall."""
    address, env = small_cluster
    cfg_path = _yaml_config(
        tmp_path, ray=f'{{address: "{address}"}}', serve="{shard_groups: 2, placement_timeout_s: 600}"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _embray_serve(tmp_path, cfg_path, port, env=env)
    try:
        waiting = wait_for(
            "/readyz to say what the application waits for",
            lambda: (got := _readyz(url, starting=True)) and "STARTING" in got.get("reason", "") and got,
            timeout=120,
        )  # (Serve first says UPDATING, no replicas yet; then STARTING: replicas that wait for a node)
        assert waiting["status"] == 503 and waiting["ready"] is False, waiting
        assert "'embray' is DEPLOYING" in waiting["reason"] and "STARTING" in waiting["reason"], waiting
        assert [_readyz(url)["status"] for _ in range(3)] == [503] * 3  # (each within 2 s)
        log = (tmp_path / "serve.log").read_text()
        assert "needs 3 CPUs (ingress 1 + 2 shard groups x 1); this Ray has 2" in log
        assert "waiting up to 600s (serve.placement_timeout_s) for nodes" in log
        took = _stopped(proc, signal.SIGINT, within=20)
        log = (tmp_path / "serve.log").read_text()
        assert proc.returncode == 130 and "stopped" in log and took < 20, log[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    short = cfg_path.read_text().replace("placement_timeout_s: 600", "placement_timeout_s: 3")
    (tmp_path / "short.yaml").write_text(short)
    t = time.monotonic()
    proc = _embray_serve(tmp_path, tmp_path / "short.yaml", free_port(), env=env, log="short.log")
    try:
        assert proc.wait(timeout=60) == 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "short.log").read_text()
    assert time.monotonic() - t < 60
    assert (
        "error: cannot serve 'docs': the application needs 3 CPUs (ingress 1 + 2 shard groups x 1); this Ray has 2: "
        "lower serve.num_cpus / serve.group_num_cpus or add nodes (waited 3s for nodes: serve.placement_timeout_s)"
        in log
    ), log[-3000:]


def test_overload_gets_503_instead_of_piling_up(served, tmp_path):
    """One slow replica (0.4 s per query), one request at a time, one queued: the rest are turned away."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from embray.serving import application

    write_corpus(tmp_path / "corpus", files=1, rows=10)
    cfg = make_config(
        tmp_path,
        collection="slow",
        model={"latency_ms": 400.0},
        serve={"max_ongoing_requests": 1, "max_queued_requests": 1, "num_cpus": 0.25, "poll_s": 3600},
    )
    Collection(cfg).backfill()  # the version's own model spec carries the latency, so its queries are slow
    serve.run(application(cfg), name="slow", route_prefix="/slow")
    url = served["url"] + "/slow"
    _wait_ready(url)

    def one(_):
        return requests.post(f"{url}/v1/collections/slow/search", json={"text": "river", "k": 1}, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        codes = [r.status_code for r in pool.map(one, range(8))]
    assert set(codes) <= {200, 503} and codes.count(503) >= 4 and codes.count(200) >= 1, codes
    serve.delete("slow")
    assert requests.get(f"{served['url']}/readyz", timeout=10).status_code == 200  # the main app is unaffected


def test_two_replicas_both_switch_on_one_reload(served, tmp_path):
    """A reload reaches one replica; the marker it writes makes the other switch too (poll_s is an hour)."""
    from ray import serve

    from embray.serving import application

    rows = write_corpus(tmp_path / "corpus", files=1, rows=60)
    cfg = make_config(
        tmp_path,
        collection="two",
        serve={"replicas": 2, "num_cpus": 0.25, "poll_s": 3600, "admin_token": TOKEN},
    )
    col = Collection(cfg)
    v1 = col.backfill().version
    write_rows(tmp_path / "corpus", mutate(rows, 5, 5, 5)[0], files=1)
    v2 = col.refresh().version
    serve.run(application(cfg), name="two", route_prefix="/two")
    url = served["url"] + "/two"
    try:
        _wait_ready(url)
        search = f"{url}/v1/collections/two/search"
        with requests.Session() as s:
            before = {s.post(search, json={"text": "river", "k": 1}, timeout=30).json()["version"] for _ in range(20)}
            assert before == {v1}
            col.promote(v2, reason="two replicas")
            r = s.post(f"{url}/v1/collections/two/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
            assert r.status_code == 200 and r.json()["version"] == v2
            time.sleep(3.0)  # the other replica sees the marker within a second, then loads
            after = [s.post(search, json={"text": "river", "k": 1}, timeout=30) for _ in range(40)]
        assert all(r.status_code == 200 for r in after)
        assert {r.json()["version"] for r in after} == {v2}
    finally:
        serve.delete("two")


def test_the_openapi_document_tells_the_truth(served):
    """Every status code the tests can provoke on a route is documented there, with an error body; the request
    schema states its rules; an unknown field (a typo such as `top_k`) is refused instead of ignored."""
    url, fp = served["url"], fingerprint(served["cfg"].model)
    doc = requests.get(f"{url}/openapi.json", timeout=10).json()
    paths = doc["paths"]
    search = paths["/v1/collections/{name}/search"]["post"]
    documented = (
        {("search", int(c)) for c in search["responses"]}
        | {("info", int(c)) for c in paths["/v1/collections/{name}"]["get"]["responses"]}
        | {("reload", int(c)) for c in paths["/v1/collections/{name}/reload"]["post"]["responses"]}
        | {("readyz", int(c)) for c in paths["/readyz"]["get"]["responses"]}
    )
    assert {("search", c) for c in (200, 401, 404, 409, 413, 422, 500, 503)} <= documented
    assert {("reload", c) for c in (200, 401, 403, 404)} <= documented
    for code in ("401", "404", "409", "413", "422", "503"):
        assert search["responses"][code]["description"]
        assert search["responses"][code]["content"]["application/json"]["schema"]

    observed = set()
    base = f"{url}/v1/collections/docs"
    for body in (
        {"text": "river", "k": 2},  # 200
        {"text": "river", "top_k": 2},  # 422: unknown field
        {"text": "river", "vector": [0.1] * 64, "fingerprint": fp},  # 422: both
        {"k": 3},  # 422: neither
        {"vector": [0.1] * 64},  # 422: no fingerprint
        {"vector": [0.1] * 64, "fingerprint": "0" * 24},  # 409
        {"text": "x" * 501},  # 413
    ):
        observed.add(("search", _search(url, body).status_code))
    observed.add(
        ("search", requests.post(f"{url}/v1/collections/nope/search", json={"text": "a"}, timeout=10).status_code)
    )
    observed.add(("info", requests.get(base, timeout=10).status_code))
    observed.add(("info", requests.get(f"{url}/v1/collections/nope", timeout=10).status_code))
    observed.add(("reload", requests.post(f"{base}/reload", timeout=10).status_code))
    observed.add(
        (
            "reload",
            requests.post(f"{base}/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).status_code,
        )
    )
    observed.add(("readyz", requests.get(f"{url}/readyz", timeout=10).status_code))
    assert observed == {
        ("search", 200),
        ("search", 422),
        ("search", 409),
        ("search", 413),
        ("search", 404),
        ("info", 200),
        ("info", 404),
        ("reload", 401),
        ("reload", 200),
        ("readyz", 200),
    }
    assert observed <= documented, observed - documented
    typo = _search(url, {"text": "river", "top_k": 2})
    assert typo.status_code == 422 and "top_k" in typo.text

    schema = doc["components"]["schemas"]["SearchRequest"]
    assert schema["additionalProperties"] is False
    one_of = [sorted(c["required"]) for c in schema["oneOf"]]
    assert one_of == [["text"], ["fingerprint", "vector"], ["queries"]]  # exactly one kind of query

    # The schema and the server agree on every body: valid by the schema <=> not refused as malformed (422).
    # Nulls for text / vector / fingerprint are refused by both (a schema-driven fuzzer found `{"text": null}`).
    root = {"$ref": "#/components/schemas/SearchRequest", "components": doc["components"]}  # (Query: a $ref)
    validator = jsonschema.Draft202012Validator(root)
    vec = [0.1] * 64
    for body in (
        {"text": "river"},
        {"text": "river", "k": 1, "version": "active", "partial": True},
        {"text": "river", "fingerprint": fp},
        {"vector": vec, "fingerprint": fp},
        {"text": None},
        {"text": None, "vector": vec, "fingerprint": fp},
        {"text": "river", "vector": None},
        {"vector": vec, "fingerprint": None},
        {"text": "river", "fingerprint": None},
        {"text": "river", "version": None},
        {"text": 3},
        {"text": "river", "k": 0},
        {"text": "river", "k": 1001},
        {"text": "river", "k": None},
        {"vector": "abc", "fingerprint": fp},
        {"text": "river", "vector": vec, "fingerprint": fp},
        {},
        {"queries": [{"text": "river"}, {"vector": vec, "fingerprint": fp}], "k": 2, "chunks": True},
        {"queries": []},
        {"queries": None},
        {"queries": [{"text": None}]},
        {"queries": [{"vector": vec}]},
        {"queries": [{"text": "river", "k": 3}]},
        {"queries": [{"text": "river"}], "text": "stone"},
        {"queries": [{"text": "river", "vector": vec, "fingerprint": fp}]},
        {"text": "river", "filter": {"tenant": "acme"}, "fields": ["n", "text"]},
        {"queries": [{"text": "river"}], "filter": {"n": {"$gte": 3}}, "fields": []},
        {"text": "river", "filter": None},
        {"text": "river", "filter": "acme"},
        {"text": "river", "fields": None},
        {"text": "river", "fields": [3]},
        {"queries": [{"text": "river", "filter": {"n": 1}}]},
        {"text": "river", "mode": "keyword"},
        {"text": "river", "mode": "hybrid", "weights": {"vector": 2}},
        {"text": "river", "mode": "fuzzy"},
        {"text": "river", "mode": None},
        {"text": "river", "weights": None},
        {"text": "river", "mode": "hybrid", "weights": {"vector": -1}},
        {"text": "river", "mode": "hybrid", "weights": {"words": 1}},
    ):
        r = _search(url, body)
        valid = validator.is_valid(body)
        assert valid == (r.status_code != 422), (body, valid, r.status_code, r.text[:300])
    assert "`text` is null: leave it out" in _search(url, {"text": None}).text


def test_a_batch_answers_every_query_in_order_from_one_version(served):
    """{"queries": [...]}: one round trip, each query's hits exactly what it gets alone, in the order asked;
    a bad query is named by its position; more than serve.max_batch is 413."""
    url, cfg, rows = served["url"], served["cfg"], served["rows"]
    fp = fingerprint(cfg.model)
    texts = [rows[f"doc-{i:06d}"] for i in (3, 42, 117)]
    vec = load_embedder(cfg.model).embed_queries(["river stone"])[0].tolist()
    queries = [{"text": texts[0]}, {"vector": vec, "fingerprint": fp}, {"text": texts[1]}, {"text": texts[2]}]
    r = _search(url, {"queries": queries, "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    alone = [_search(url, {**q, "k": 4}).json() for q in queries]
    assert body["results"] == [a["results"] for a in alone] and len(body["results"]) == 4
    assert {a["version"] for a in alone} == {body["version"]}
    tops = [body["results"][i][0]["id"] for i in (0, 2, 3)]
    assert tops == ["doc-000003", "doc-000042", "doc-000117"]  # each text finds its own row, in order

    bad = _search(url, {"queries": [{"text": "a"}, {"vector": vec, "fingerprint": "0" * 24}], "k": 2})
    assert bad.status_code == 409 and "queries[1]" in bad.json()["detail"]
    short = _search(url, {"queries": [{"text": "a"}, {"vector": vec[:5], "fingerprint": fp}]})
    assert short.status_code == 422 and "queries[1]: vector has 5 dimensions" in short.json()["detail"]
    many = _search(url, {"queries": [{"text": "a"}] * (cfg.serve.max_batch + 1)})
    assert many.status_code == 413 and "serve.max_batch" in many.json()["detail"]
    assert _search(url, {"queries": [{"text": "a"}] * cfg.serve.max_batch, "k": 1}).status_code == 200

    col = Collection(cfg)  # the same in Python: one call, one embedding batch, one version
    many = col.search_many([texts[0], texts[2]], k=4, version=body["version"])
    assert [[h.to_dict() for h in m.results] for m in many] == [body["results"][0], body["results"][3]]
    by_vec = col.search_many(vectors=[vec], fingerprint=fp, k=4, version=body["version"])
    assert [h.to_dict() for h in by_vec[0].results] == body["results"][1]
    with pytest.raises(VersionError, match="made in space"):
        col.search_many(vectors=[vec], fingerprint="0" * 24)
    with pytest.raises(ConfigError, match="non-empty list"):
        col.search_many([])


def test_filters_and_fields_over_http_answer_from_each_version_own_metadata(served):
    """`filter` and `fields` in the body: the hits are Python's for the same query, every one matches, carries
    the columns asked for (and its text), from the version that answered (a pinned version's own metadata);
    a batch applies them to every query; what the version cannot answer is a 422 naming it; the searches are
    counted by mode and filter in Prometheus."""
    import ray

    url, cfg, rows, changed, v1, v2 = (served[k] for k in ("url", "cfg", "rows", "changed", "v1", "v2"))
    col = Collection(cfg)
    query, names = rows["doc-000007"], ["tenant", "n", "text"]
    flt = {"tenant": {"$in": ["acme", "initech"]}, "n": {"$lt": 200}}
    r = _search(url, {"text": query, "k": 8, "filter": flt, "fields": names})
    assert r.status_code == 200, r.text
    doc = r.json()
    want = col.search(query, k=8, version=doc["version"], filter=flt, fields=names)
    assert doc["results"] == [h.to_dict() for h in want.results] and len(doc["results"]) == 8
    for h in doc["results"]:
        n = row_number(h["id"])
        assert h["fields"] == {"tenant": TENANTS[n % 3], "n": n, "text": rows[h["id"]]} and n < 200
        assert h["fields"]["tenant"] != "globex"

    # Every matching row and no other (k above the matches): v1's rows, or v2's (its inserted rows too).
    for version, corpus in ((v1, rows), (v2, changed)):
        body = {"text": query, "k": 1000, "version": version, "filter": {"n": {"$lt": 20}}, "fields": ["text"]}
        got = _search(url, body).json()["results"]
        assert {h["id"] for h in got} == {i for i in corpus if row_number(i) < 20}
        assert all(h["fields"]["text"] == corpus[h["id"]] for h in got)  # v2's texts are v2's

    # Keyword and hybrid modes: Python's answer, filtered alike; vectors cannot be asked by keyword.
    word = query.split()[0]
    for mode, extra in (("keyword", {}), ("hybrid", {}), ("hybrid", {"weights": {"vector": 0.5, "keyword": 2}})):
        body = {"text": f"{word} item7", "k": 6, "mode": mode, "filter": flt, "fields": ["tenant"], **extra}
        got = _search(url, body)
        assert got.status_code == 200, got.text
        py = col.search(f"{word} item7", k=6, mode=mode, filter=flt, fields=["tenant"], weights=extra.get("weights"))
        assert got.json()["results"] == [h.to_dict() for h in py.results] and py.results
        assert all(h.fields["tenant"] != "globex" for h in py.results)
    vec = load_embedder(cfg.model).embed_queries(["river"])[0].tolist()
    by_vec = _search(url, {"vector": vec, "fingerprint": fingerprint(cfg.model), "mode": "keyword"})
    assert by_vec.status_code == 422 and "searches by text" in by_vec.text
    assert _search(url, {"text": "x", "mode": "fuzzy"}).status_code == 422
    assert _search(url, {"text": "x", "mode": "hybrid", "weights": {"vector": -1}}).status_code == 422

    batch = _search(url, {"queries": [{"text": query}, {"text": rows["doc-000042"]}], "k": 3, "filter": flt})
    alone = [_search(url, {"text": t, "k": 3, "filter": flt}).json()["results"] for t in (query, rows["doc-000042"])]
    assert batch.status_code == 200 and batch.json()["results"] == alone

    for body, needle in (
        ({"filter": {"tenat": "acme"}}, "unknown column 'tenat'"),
        ({"filter": {"n": {"$regex": "1"}}}, "$regex"),
        ({"filter": {"n": {"$gt": "x"}}}, "'n'"),
        ({"fields": ["nope"]}, "unknown field 'nope'"),
        ({"filter": None}, "`filter` is null"),
        ({"fields": "tenant"}, "fields"),
    ):
        bad = _search(url, {"text": query, **body})
        assert bad.status_code == 422 and needle in bad.text, (body, bad.status_code, bad.text)

    port = ray._private.worker.global_worker.node.metrics_export_port
    wait_for(
        "filtered searches in Prometheus",
        lambda: any(
            ln.startswith("ray_embray_searches_total") and 'filtered="true"' in ln and 'mode="hybrid"' in ln
            for ln in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
        ),
        timeout=60,
    )


def test_a_pinned_query_answers_from_that_version_and_replicas_keep_few(served):
    """{"version": ...}: an id or alias answers from that committed version, loaded on demand; at most
    serve.max_loaded_versions (3: the active one and two pinned) stay loaded; unknown names are 404."""
    url, cfg = served["url"], served["cfg"]
    col = Collection(cfg)
    active = col.aliases()["active"]  # served once the poller has seen it (an earlier test may have just moved it)
    wait_for("the active version served", lambda: _info(url)["version"] == active, timeout=30)
    extra = [col.refresh(parent=served["v1"]).version for _ in range(2)]  # unchanged corpus: cheap versions
    others = [v for v in (served["v1"], served["v2"], *extra) if v != active]
    assert len(others) >= 3
    text = served["rows"]["doc-000042"]

    for v in others:
        r = _search(url, {"text": text, "k": 3, "version": v})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == v
    pinned = requests.get(f"{url}/v1/collections/docs", timeout=10).json()["pinned"]
    assert pinned == others[-2:]  # the least recently used one was unloaded
    r = _search(url, {"text": text, "k": 3, "version": others[-2]})  # a hit moves it to the back
    assert r.json()["version"] == others[-2]
    assert requests.get(f"{url}/v1/collections/docs", timeout=10).json()["pinned"] == [others[-1], others[-2]]
    assert requests.get(f"{url}/v1/collections/docs", timeout=10).json()["version"] == active  # unmoved

    # Aliases: `active` is the served version; another alias is read from MLflow.
    assert _search(url, {"text": text, "version": "active"}).json()["version"] == active
    from embray.lifecycle.registry import CANDIDATE, Registry

    Registry(cfg).set_alias(CANDIDATE, others[-1])
    try:
        assert _search(url, {"text": text, "version": CANDIDATE}).json()["version"] == others[-1]
    finally:
        Registry(cfg).delete_alias(CANDIDATE)

    # A vector pinned to a version answers from it; one from another space is refused, naming both spaces.
    vec = load_embedder(cfg.model).embed_queries([text])[0].tolist()
    r = _search(url, {"vector": vec, "fingerprint": fingerprint(cfg.model), "k": 3, "version": others[0]})
    assert r.status_code == 200 and r.json()["version"] == others[0]
    other = ModelSpec(backend="hash", name="words", dims=64, seed=7)
    ovec = load_embedder(other).embed_queries(["river"])[0].tolist()
    r = _search(url, {"vector": ovec, "fingerprint": fingerprint(other), "version": others[0]})
    assert r.status_code == 409 and others[0] in r.json()["detail"]

    missing = "v20200101T000000000Z-abcdef"
    r = _search(url, {"text": text, "version": missing})
    assert r.status_code == 404 and missing in r.json()["detail"]
    r = _search(url, {"text": text, "version": "no-such-alias"})
    assert r.status_code == 404 and "neither a version id nor an alias" in r.json()["detail"]
    assert requests.get(f"{url}/v1/collections/docs", timeout=10).json()["version"] == active


def test_shard_groups_answer_from_one_version_through_a_promotion_and_a_rollback(served, tmp_path):
    """serve.shard_groups 2 (two replicas each): every answer under load, across a promotion and a rollback,
    is exactly the whole version's answer for the version it names (never a merge of two versions); a group
    that cannot answer fails the request with a 503 naming it, or, asked for, a partial answer saying what is
    missing."""
    from ray import serve

    from embray.lifecycle.versions import file_rel, read_manifest
    from embray.search import VersionIndex, group_shards
    from embray.serving import application
    from embray.serving.groups import read_groups
    from embray.storage.store import Store

    rows = write_corpus(tmp_path / "corpus", files=2, rows=100)
    add_columns(tmp_path / "corpus")
    cfg = make_config(
        tmp_path,
        collection="sharded",
        source={"columns": ["tenant", "n"]},
        index={"shards": 4, "max_delta_fraction": 0.4, "keywords": True},  # v2, v3: delta segments on v1's bases
        serve={
            "shard_groups": 2,
            "group_replicas": 2,
            "num_cpus": 0.1,
            "group_num_cpus": 0.1,
            "poll_s": 3600,
            "admin_token": TOKEN,
        },
    )
    col = Collection(cfg)
    v1 = col.backfill().version
    changed, inserted, *_ = mutate(rows, 15, 15, 5)
    write_rows(tmp_path / "corpus", changed, files=2)
    add_columns(tmp_path / "corpus")
    refreshed = col.refresh()
    v2 = refreshed.version
    assert refreshed.manifest.counts["shards_delta"] == 4
    query = changed[sorted(inserted)[0]]
    expected = {v: [h.id for h in col.index(v).search_text([query], 5)[0]] for v in (v1, v2)}
    assert expected[v1] != expected[v2]
    serve.run(application(cfg), name="sharded", route_prefix="/sharded")
    url = served["url"] + "/sharded"
    search = f"{url}/v1/collections/sharded/search"
    log: list[tuple[float, int, str | None, list]] = []
    stop = threading.Event()

    def client():
        with requests.Session() as s:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = s.post(search, json={"text": query, "k": 5}, timeout=30)
                    doc = r.json()
                    log.append((t0, r.status_code, doc.get("version"), [h["id"] for h in doc.get("results", [])]))
                except requests.RequestException as e:
                    log.append((t0, 0, repr(e), []))

    try:
        _wait_ready(url)
        info = requests.get(f"{url}/v1/collections/sharded", timeout=10).json()
        assert info["shard_groups"] == 2 and info["version"] == v1
        live = read_groups(Store(cfg.store.uri), "sharded", 2)
        assert [len(live[g]) for g in (0, 1)] == [2, 2] and all(v1 in r.loaded for g in live for r in live[g])
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        reload = {"Authorization": f"Bearer {TOKEN}"}
        try:
            time.sleep(1.0)
            col.promote(v2, reason="sharded cutover")
            r = requests.post(f"{url}/v1/collections/sharded/reload", headers=reload, timeout=120)
            assert r.json()["version"] == v2, r.json()
            t_v2 = time.monotonic()
            live = read_groups(Store(cfg.store.uri), "sharded", 2)  # two-phase: all had it before the switch
            assert all(v2 in r.loaded for g in live for r in live[g]) and sum(map(len, live.values())) == 4
            time.sleep(1.5)
            t_rollback = time.monotonic()
            col.rollback(reason="sharded cutover")
            r = requests.post(f"{url}/v1/collections/sharded/reload", headers=reload, timeout=120)
            assert r.json()["version"] == v1, r.json()
            t_v1 = time.monotonic()
            time.sleep(1.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
        failed = [e for e in log if e[1] != 200]
        assert not failed, failed[:5]
        assert len(log) > 30
        assert {v for _, _, v, _ in log} == {v1, v2}
        mixed = [(v, ids) for _, _, v, ids in log if ids != expected[v]]
        assert not mixed, mixed[:5]
        assert all(v == v2 for t0, _, v, _ in log if t_v2 < t0 < t_rollback)
        assert all(v == v1 for t0, _, v, _ in log if t0 > t_v1)

        # A filter and fields go to every group, each filtering its own shards: the whole version's answer.
        for v in (v1, v2):
            body = {"text": query, "k": 5, "version": v, "filter": {"tenant": "globex"}, "fields": ["n"]}
            r = requests.post(search, json=body, timeout=30)
            want = col.search(query, k=5, version=v, filter={"tenant": "globex"}, fields=["n"])
            assert r.status_code == 200 and r.json()["results"] == [h.to_dict() for h in want.results], r.text
            assert len(want.results) == 5 and all(row_number(h.id) % 3 == 1 for h in want.results)
        for mode in ("keyword", "hybrid"):  # each side merged over the groups, then fused: the whole version's
            for v in (v1, v2):
                body = {"text": query, "k": 5, "version": v, "mode": mode, "filter": {"tenant": "globex"}}
                r = requests.post(search, json=body, timeout=30)
                want = col.search(query, k=5, version=v, mode=mode, filter={"tenant": "globex"})
                assert r.status_code == 200 and r.json()["results"] == [h.to_dict() for h in want.results], r.text
        bad = requests.post(search, json={"text": query, "filter": {"$or": "x"}}, timeout=30)
        assert bad.status_code == 422 and "$or" in bad.text

        # A version one group cannot load (a shard file of group 1 lost): 503 naming the group, or partial.
        write_rows(tmp_path / "corpus", mutate(changed, 3, 3, 0)[0], files=2)
        add_columns(tmp_path / "corpus")
        v3 = col.refresh().version
        store = Store(cfg.store.uri)
        m = read_manifest(store, "sharded", v3)
        lost = next(s for s in m.shards if s.shard in group_shards(4, 1, 2) and s.segments)
        os.remove(store.path(file_rel(m, lost.segments[-1].embeddings)))  # v3's own segment (the base is v1's)
        r = requests.post(search, json={"text": query, "k": 5, "version": v3}, timeout=60)
        assert r.status_code == 503, r.text
        assert "shard group 1 of 2 (EmbrayShardGroup1)" in r.json()["detail"] and "partial" in r.json()["detail"]
        r = requests.post(search, json={"text": query, "k": 5, "version": v3, "partial": True}, timeout=60)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["partial"] is True and doc["missing_shards"] == group_shards(4, 1, 2) and doc["version"] == v3
        half = VersionIndex(store, m, group=(0, 2)).search_text([query], 5)[0]
        assert [h["id"] for h in doc["results"]] == [h.id for h in half]
        whole = requests.post(search, json={"text": query, "k": 5}, timeout=30).json()
        assert "partial" not in whole and whole["version"] == v1  # the active version is untouched
    finally:
        serve.delete("sharded")
