"""Alert rules and the Grafana dashboard against the real thing: promtool, a live `embray` Serve app on the
session's Ray, and a real Prometheus server on 127.0.0.1 scraping Ray's metrics endpoint.

Needs Debian's `prometheus` package (server and promtool); `scripts/test.sh` installs it where it can (root
with apt-get), and these tests skip, saying so, where it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
import requests

from embray import Collection

from .helpers import REPO, free_port, make_config, mutate, wait_for, write_corpus, write_rows

ALERTS = REPO / "deploy" / "prometheus" / "embray-alerts.yaml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "embray-alerts.test.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "embray.json"

needs_prometheus = pytest.mark.skipif(
    not (shutil.which("prometheus") and shutil.which("promtool")),
    reason="needs Debian's prometheus package (prometheus, promtool): apt-get install prometheus",
)


@needs_prometheus
def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    check = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    unit = subprocess.run(["promtool", "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def _metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (ray_... identifiers that are not followed by a '(')."""
    return {m for m in re.findall(r"\b(ray_[a-z0-9_]+)\b(?!\s*\()", expr)}


def test_the_dashboard_is_importable_json_with_queries():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "embray" and dash["panels"]
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert all(_metric_names(e) for e in exprs)
    titles = {p["title"] for p in dash["panels"]}
    for needed in ("Served version", "Served version age", "Staleness", "Status", "Requests by outcome"):
        assert needed in titles
    assert any("histogram_quantile(0.99" in e for e in exprs)


@pytest.fixture(scope="module")
def live(tmp_path_factory, ray_local):
    """A served collection (hash model) and a Prometheus server scraping Ray's metrics endpoint every second."""
    from ray import serve

    from embray.serving import application

    tmp = tmp_path_factory.mktemp("alerts")
    rows = write_corpus(tmp / "corpus", files=2, rows=100)
    port = free_port()
    cfg = make_config(
        tmp,
        collection="alerts",  # not test_serve's "docs": a stopped replica's gauges stay on Ray's endpoint ~30 s
        serve={"port": port, "poll_s": 1.0, "num_cpus": 0.5},
        monitor={"max_stale_fraction": 0.05, "interval_s": 3600},
    )
    col = Collection(cfg)
    col.backfill()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(cfg), name="embray", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the Serve app never became ready"
        time.sleep(0.3)
    metrics_port = ray_local._private.worker.global_worker.node.metrics_export_port
    yield {"cfg": cfg, "col": col, "url": url, "rows": rows, "tmp": tmp, "metrics": f"127.0.0.1:{metrics_port}"}
    serve.shutdown()


@pytest.fixture(scope="module")
def prometheus(live, tmp_path_factory):
    if not shutil.which("prometheus"):
        pytest.skip("needs Debian's prometheus package: apt-get install prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    (tmp / "prometheus.yml").write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [live["metrics"]]}]}],
            }
        )
    )
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{api}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus never became ready"
            time.sleep(0.3)
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _query(api: str, promql: str) -> list:
    r = requests.get(f"{api}/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def _alerts(api: str, name: str) -> list[dict]:
    r = requests.get(f"{api}/api/v1/alerts", timeout=10)
    r.raise_for_status()
    return [a for a in r.json()["data"]["alerts"] if a["labels"].get("alertname") == name]


@needs_prometheus
def test_the_staleness_alert_fires_through_a_real_prometheus(live, prometheus):
    col, api = live["col"], prometheus
    # The server exports the configured threshold; no status recorded yet, so nothing is stale.
    threshold = wait_for("the threshold gauge", lambda: _query(api, "max(ray_embray_staleness_threshold)"), 120, 1)
    assert float(threshold[0]["value"][1]) == 0.05
    assert wait_for("serving_alias", lambda: _query(api, "min(ray_embray_serving_alias) == 1"), 120, 1)
    assert not [a for a in _alerts(api, "EmbrayCollectionStale") if a["state"] == "firing"]

    # 20% of the rows change; one monitor check records the staleness where the replicas export it.
    changed, *_ = mutate(live["rows"], n_insert=10, n_update=20, n_delete=10)
    write_rows(live["tmp"] / "corpus", changed, files=2)
    [check] = col.monitor(iterations=1)
    assert check.staleness.fraction > 0.05 and not check.ok

    firing = wait_for(
        "EmbrayCollectionStale to fire",
        lambda: [a for a in _alerts(api, "EmbrayCollectionStale") if a["state"] == "firing"],
        120,
        1,
    )
    assert firing[0]["labels"]["collection"] == "alerts"
    assert float(firing[0]["value"]) == pytest.approx(check.staleness.fraction, rel=1e-6)
    assert "is stale" in firing[0]["annotations"]["summary"]


def test_every_dashboard_query_reads_a_live_metric(live):
    """The dashboard cannot drift from the code: every metric its queries name is on the live endpoint."""
    url, col = live["url"], live["col"]
    for body in ({"text": "river mountain", "k": 3}, {"text": "river", "k": 0}):  # an ok and a 422
        requests.post(f"{url}/v1/collections/alerts/search", json=body, timeout=30)
    col.record_status(col.status(verify=False))
    dash = json.loads(DASHBOARD.read_text())
    wanted = set().union(*(_metric_names(t["expr"]) for p in dash["panels"] for t in p["targets"]))
    deadline = time.monotonic() + 90
    while True:
        text = requests.get(f"http://{live['metrics']}/metrics", timeout=10).text
        names = {ln.split("{", 1)[0].split(" ", 1)[0] for ln in text.splitlines() if ln and not ln.startswith("#")}
        if wanted <= names or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not wanted - names, f"dashboard metrics missing from the live endpoint: {sorted(wanted - names)}"
