"""Shadow traffic over real HTTP: live text queries also go to the candidate, their overlap@10 with the
active answers and the candidate's latency show in Prometheus, the store and `embray status`, and the
promotion gate monitor.shadow_min_overlap refuses a weak candidate."""

from __future__ import annotations

import time

import pytest
import requests

from embray import Collection
from embray.cli import _status_human
from embray.errors import GateError
from embray.models import ModelSpec
from embray.quality.shadow import read_shadow

from .helpers import free_port, make_config, wait_for, write_corpus

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]


def test_shadow_traffic_measures_the_candidate_and_its_gate_refuses_a_weak_one(tmp_path):
    import ray
    from ray import serve

    from embray.serving import application

    rows = write_corpus(tmp_path / "corpus", files=2, rows=100)
    port = free_port()
    cfg = make_config(
        tmp_path,
        collection="shadow",
        serve={"port": port, "poll_s": 1.0, "num_cpus": 0.5, "shadow": {"fraction": 1.0}},
        monitor={"shadow_min_overlap": 0.9, "shadow_min_queries": 20},
    )
    col = Collection(cfg)
    v1 = col.backfill().version
    # A weak candidate: the same words hashed with another seed, so its neighbours are others.
    v2 = col.migrate(ModelSpec(backend="hash", name="words", dims=64, seed=7)).version
    assert read_shadow(col.store, "shadow", v2) is None
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(cfg), name="shadow", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    metrics_url = f"http://127.0.0.1:{ray._private.worker.global_worker.node.metrics_export_port}/metrics"

    def search(i: int) -> requests.Response:
        return requests.post(
            f"{url}/v1/collections/shadow/search", json={"text": rows[f"doc-{i:06d}"], "k": 10}, timeout=30
        )

    try:
        wait_for("ready", lambda: requests.get(f"{url}/readyz", timeout=5).status_code == 200)
        first = search(0)
        assert first.status_code == 200 and first.json()["version"] == v1  # answered by the active version only
        wait_for("the candidate loaded for shadow queries", lambda: read_shadow(col.store, "shadow", v2))
        for i in range(1, 41):
            r = search(i)
            assert r.status_code == 200 and r.json()["version"] == v1
            time.sleep(0.05)
        stats = wait_for(
            "40 shadow queries", lambda: (s := read_shadow(col.store, "shadow", v2)) and s.queries >= 35 and s
        )
        assert stats.candidate == v2 and stats.replicas == 1 and stats.p99_ms >= stats.p50_ms > 0
        assert 0 < stats.overlap_at_10 < 0.9  # the doc itself is in both top-10s; its neighbours differ

        lines = wait_for(
            "the shadow series",
            lambda: [
                ln
                for ln in requests.get(metrics_url, timeout=10).text.splitlines()
                if ln.startswith("ray_embray_shadow_") and f'candidate="{v2}"' in ln
            ],
        )
        assert any(ln.startswith("ray_embray_shadow_queries_total") for ln in lines)
        assert any(ln.startswith("ray_embray_shadow_overlap_at_10") for ln in lines)
    finally:
        serve.shutdown()

    st = col.status(verify=False, staleness=False)
    assert st.shadow is not None and st.shadow.candidate == v2 and st.shadow.queries == stats.queries
    assert f"shadow    {stats.queries} live queries: overlap@10 with active {stats.overlap_at_10}" in _status_human(st)

    with pytest.raises(
        GateError, match=r"shadow_overlap_at_10: live overlap@10 with the active answers 0\.\d+ vs floor 0\.9"
    ):
        col.promote(v2)
    strict = make_config(tmp_path, collection="shadow", monitor={"shadow_min_overlap": 0.1, "shadow_min_queries": 1000})
    with pytest.raises(GateError, match=r"not enough shadow traffic: \d+ of the 1000 live queries"):
        Collection(strict).promote(v2)
    forced = col.promote(v2, force=True, reason="the new model is known to differ")
    assert forced.forced and forced.active == v2
    assert [g.gate for g in forced.gates if not g.passed] == ["shadow_overlap_at_10"]


def test_a_shadow_query_carries_its_filter_mode_and_weights_to_the_candidate():
    """The candidate is asked the query the user asked: with its filter, mode and weights (not its fields)."""
    import queue
    from types import SimpleNamespace

    from embray.serving.shadow import ShadowSender

    asked = []
    sender = ShadowSender.__new__(ShadowSender)  # (no thread, no Ray metrics: the hand-off alone)
    sender.fraction, sender._queue = 1.0, queue.Queue()
    sender._ask = lambda text, k, where: asked.append((text, k, where))
    sender.recorder = SimpleNamespace(add=lambda *a: None, mean_overlap=lambda v: 1.0)
    sender._metrics = SimpleNamespace(record=lambda *a: None, drop=lambda: None)
    ids = [f"doc-{i}" for i in range(10)]
    where = {"filter": {"tenant": "acme"}, "fields": ["n"], "mode": "hybrid", "weights": {"vector": 1, "keyword": 2}}
    sender.offer("river", ids, where)
    sender.offer("stone", ids[:5], where)  # fewer than 10 hits: says nothing about overlap@10, not sent
    sender.offer("plain", ids)
    while not sender._queue.empty():
        sender._one(*sender._queue.get())
    assert asked == [
        ("river", 10, {"filter": {"tenant": "acme"}, "mode": "hybrid", "weights": {"vector": 1, "keyword": 2}}),
        ("plain", 10, None),
    ]
