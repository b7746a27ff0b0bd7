"""The production shape, on one machine: a multi-node Ray (head + a worker node with an `accelerator`
resource), moto's S3 server, an MLflow tracking server, jobs submitted through the Jobs API, and the Serve
app deployed through the Serve REST API. See tests/cluster.py for the harness.

Skip it locally with ``./scripts/test.sh -m "not cluster"``; CI runs it.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from .cluster import LocalCluster, new_root
from .helpers import REPO, doc_text

pytestmark = pytest.mark.cluster

ROWS = 600  # 3 files of 200: past SMALL_EMBED_BATCHES x batch_size, so the backfill goes through the actor pool
BATCH = 64


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(root=new_root())
    try:
        c.up()
        yield c
    finally:
        c.down()
        shutil.rmtree(c.root, ignore_errors=True)


@pytest.fixture(scope="module")
def s3fs_(cluster):
    import boto3
    import s3fs

    boto3.client(
        "s3",
        endpoint_url=cluster.s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket="embray")
    return s3fs.S3FileSystem(**cluster.storage_options)


def _write_source(fs, prefix: str, rows: dict[str, str], files: int = 3) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = sorted(rows)
    for f in range(files):
        part = ids[f::files]
        with fs.open(f"embray/{prefix}/part-{f:05d}.parquet", "wb") as fh:
            pq.write_table(pa.table({"id": part, "text": [rows[i] for i in part]}), fh)
    fs.invalidate_cache()


def _job_dir(tmp_path: Path, cluster: LocalCluster, collection: str, **over) -> Path:
    """A job's working directory: the embray config (S3, the MLflow server, `ray: {address: auto}`) and the
    job entry points, as a user would submit them."""
    d = tmp_path / f"job-{collection}"
    shutil.copytree(REPO / "jobs", d / "jobs")
    opts = cluster.storage_options
    cfg = {
        "collection": collection,
        "source": {"uri": f"s3://embray/{collection}/corpus", "storage_options": opts},
        "store": {"uri": "s3://embray/store", "storage_options": opts},
        "model": {"backend": "hash", "name": "words", "dims": 64},
        "index": {"shards": 2},
        "embed": {
            "batch_size": BATCH,
            "actors": 1,
            "num_cpus": 1,
            "resources": {"accelerator": 1},
            "keep_warm_s": 0,
        },
        "mlflow": {"tracking_uri": cluster.tracking_uri},
        "ray": {"address": "auto"},
        "serve": {"poll_s": 1, "num_cpus": 0.5},
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    (d / "embray.yaml").write_text(yaml.safe_dump(cfg))
    return d


def _submit(cluster: LocalCluster, workdir: Path, args: str, timeout_s: float = 300) -> tuple[str, str, float]:
    """Submit ``python <args>`` with ``workdir`` as the job's working_dir; wait for it: (status, logs, seconds)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth)
    t = time.monotonic()
    job = client.submit_job(entrypoint=f"python {args}", runtime_env={"working_dir": str(workdir)})
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() - t > timeout_s:
            client.stop_job(job)
            raise TimeoutError(f"job {args!r} still {status} after {timeout_s:g}s:\n{client.get_job_logs(job)[-3000:]}")
        time.sleep(1)
    return str(status.value), client.get_job_logs(job), time.monotonic() - t


def _last_json(logs: str) -> dict:
    """The last JSON object a job printed (--json output is indented; log lines may surround it)."""
    decoder, found = json.JSONDecoder(), None
    for i in [i for i in range(len(logs)) if logs.startswith("{", i) and (i == 0 or logs[i - 1] == "\n")]:
        try:
            obj, _ = decoder.raw_decode(logs, i)
        except ValueError:
            continue
        if isinstance(obj, dict):
            found = obj
    assert found is not None, f"no JSON in the job's logs:\n{logs[-3000:]}"
    return found


def _mlflow(cluster: LocalCluster):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cluster.tracking_uri, registry_uri=cluster.tracking_uri)


def test_a_resource_no_node_offers_fails_in_bounded_time_naming_it(cluster, s3fs_, tmp_path):
    _write_source(s3fs_, "unplaced/corpus", {f"d{i}": doc_text(i) for i in range(30)})
    job = _job_dir(tmp_path, cluster, "unplaced", embed={"resources": {"tpu": 1}, "placement_timeout_s": 5})
    status, logs, seconds = _submit(cluster, job, "jobs/backfill.py --config embray.yaml --json", timeout_s=180)
    assert status == "FAILED"
    assert "no alive Ray node offers what an embedding actor needs (CPU: 1, tpu: 1, memory: 0.30 GiB) after 5s" in logs
    assert "no alive node has resource tpu" in logs and seconds < 120
    assert not s3fs_.exists("embray/store/unplaced/versions") or not [
        p for p in s3fs_.ls("embray/store/unplaced/versions") if s3fs_.exists(f"{p}/manifest.json")
    ]
    assert _mlflow(cluster).search_model_versions("name='embray.unplaced'") == []


def _deploy(cluster: LocalCluster, config: Path, timeout_s: float = 180) -> str:
    """serve/config.yaml's applications (embray, and embray-readyz, which answers /readyz), through the Serve
    REST API (what `serve deploy` calls), with the embray config of this test, a port of its own and one small
    replica; returns the endpoint's URL."""
    shipped = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    app, ready = shipped["applications"]
    assert ready["name"] == "embray-readyz" and ready["args"] == {"app": app["name"]}
    app["args"] = {"config": str(config)}
    (dep,) = app["deployments"]
    dep.pop("autoscaling_config")
    dep.update(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
    body = {"http_options": {"host": "127.0.0.1", "port": cluster.serve_port}, "applications": [app, ready]}
    put = requests.put(f"{cluster.dashboard_url}/api/serve/applications/", json=body, headers=cluster.auth, timeout=60)
    put.raise_for_status()
    url = f"http://127.0.0.1:{cluster.serve_port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return url
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            status = requests.get(f"{cluster.dashboard_url}/api/serve/applications/", headers=cluster.auth, timeout=10)
            status = status.text
            raise TimeoutError(f"the Serve app did not get ready in {timeout_s:g}s: {status[-2000:]}")
        time.sleep(1)


class _Load:
    """Clients querying the endpoint until stopped; every answer's (status, version) is kept."""

    def __init__(self, url: str, collection: str, clients: int = 3):
        self.url, self.collection = url, collection
        self.answers: list[tuple[int, str | None]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        n = 0
        with requests.Session() as s:
            while not self.stop.is_set():
                n += 1
                try:
                    r = s.post(
                        f"{self.url}/v1/collections/{self.collection}/search",
                        json={"text": doc_text(i * 1000 + n), "k": 5},
                        timeout=30,
                    )
                    self.answers.append((r.status_code, r.json().get("version") if r.ok else r.text[:200]))
                except requests.RequestException as e:
                    self.answers.append((0, str(e)[:200]))

    def __enter__(self) -> _Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def wait_for(self, version: str, timeout_s: float) -> float:
        """Seconds until an answer names ``version``."""
        t = time.monotonic()
        while not any(v == version for _, v in self.answers[-20:]):
            if time.monotonic() - t > timeout_s:
                raise TimeoutError(f"no answer from {version} within {timeout_s:g}s; last: {self.answers[-3:]}")
            time.sleep(0.2)
        return time.monotonic() - t


def test_the_lifecycle_through_submitted_jobs_and_a_deployed_endpoint(cluster, s3fs_, tmp_path):
    name = "life"
    rows = {f"doc-{i:05d}": doc_text(i) for i in range(ROWS)}
    _write_source(s3fs_, f"{name}/corpus", rows)
    job = _job_dir(tmp_path, cluster, name)
    (job / "model-v2.yaml").write_text(yaml.safe_dump({"backend": "hash", "name": "words", "dims": 64, "seed": 7}))
    mlflow = _mlflow(cluster)

    status, logs, _ = _submit(cluster, job, "jobs/backfill.py --config embray.yaml --json")
    assert status == "SUCCEEDED", logs[-3000:]
    out = _last_json(logs)
    v1 = out["version"]
    assert mlflow.get_model_version_by_alias(f"embray.{name}", "active").tags["embray.version"] == v1
    # the actor pool ran only on the node that offers the embedding resource (the worker), and MLflow says so
    head, worker = cluster.node_ids()
    assert out["rows"] == ROWS and out["embedded"] == ROWS and out["aliases"] == ["active"]
    assert out["embed_nodes"] == [worker] and head not in out["embed_nodes"]
    run = mlflow.get_run(mlflow.get_model_version(f"embray.{name}", out["model_version"]).run_id)
    assert run.data.params["embed.nodes"] == worker

    url = _deploy(cluster, job / "embray.yaml")
    with _Load(url, name) as load:
        load.wait_for(v1, 30)

        # refresh through a job, promoted: served within poll_s (1 s) and the time a replica takes to load it
        rows.update({f"doc-{i:05d}": doc_text(i) + " revised" for i in range(0, ROWS, 10)})
        _write_source(s3fs_, f"{name}/corpus", rows)
        status, logs, _ = _submit(cluster, job, "jobs/refresh.py --config embray.yaml --promote --json")
        assert status == "SUCCEEDED", logs[-3000:]
        out = _last_json(logs)
        v2 = out["version"]
        assert (out["parent"], out["embedded"], out["aliases"]) == (v1, ROWS // 10, ["active"])
        assert out["embed_nodes"] == [worker]  # a small refresh: one task instead of the pool, on the same node
        assert load.wait_for(v2, 30) < 30

        # a new model: a shadow rebuild to `candidate`, then promoted by a job of its own
        status, logs, _ = _submit(cluster, job, "jobs/migrate.py --config embray.yaml --model model-v2.yaml --json")
        assert status == "SUCCEEDED", logs[-3000:]
        v3 = _last_json(logs)["version"]
        aliases = mlflow.get_registered_model(f"embray.{name}").aliases
        assert (aliases["candidate"], aliases["active"]) == (
            mlflow.get_model_version_by_alias(f"embray.{name}", "candidate").version,
            mlflow.get_model_version_by_alias(f"embray.{name}", "active").version,
        )
        status, logs, _ = _submit(cluster, job, f"-m embray.cli promote {v3} --config embray.yaml --reason cluster")
        assert status == "SUCCEEDED", logs[-3000:]
        load.wait_for(v3, 30)
        time.sleep(1)

    assert load.answers and all(s == 200 for s, _ in load.answers), [a for a in load.answers if a[0] != 200][:5]
    served = {v for _, v in load.answers}
    assert served <= {v1, v2, v3}, served
    tags = mlflow.get_model_version_by_alias(f"embray.{name}", "active").tags
    assert tags["embray.version"] == v3

    # one monitor check, as a job: current, consistent, and served as the alias says
    cfg = yaml.safe_load((job / "embray.yaml").read_text())
    cfg["serve"]["url"] = url
    cfg["model"] = yaml.safe_load((job / "model-v2.yaml").read_text())  # the active model now, for refreshes
    (job / "embray.yaml").write_text(yaml.safe_dump(cfg))
    status, logs, _ = _submit(cluster, job, "jobs/monitor.py --config embray.yaml --once --json")
    assert status == "SUCCEEDED", logs[-3000:]
    report = _last_json(logs)
    assert report["ok"] is True and report["active"]["id"] == v3, report

    # a failed job: a corrupt source file ends FAILED with the reason in one line, and leaves no version
    before = len(mlflow.search_model_versions(f"name='embray.{name}'"))
    with s3fs_.open(f"embray/{name}/corpus/part-00001.parquet", "wb") as fh:
        fh.write(b"PAR1 this is not parquet")
    s3fs_.invalidate_cache()
    status, logs, _ = _submit(cluster, job, "jobs/refresh.py --config embray.yaml --json")
    assert status == "FAILED"
    assert "part-00001.parquet is not a readable Parquet file" in logs
    assert len(mlflow.search_model_versions(f"name='embray.{name}'")) == before
    assert mlflow.get_model_version_by_alias(f"embray.{name}", "active").tags["embray.version"] == v3


def test_a_lost_embedding_node_fails_the_job_in_bounded_time_and_a_rerun_resumes(cluster, s3fs_, tmp_path):
    """Last in this module: it kills the worker node (the only one with the accelerator) mid-backfill, then
    starts it again."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    name = "nodeloss"
    rows = {f"doc-{i:05d}": doc_text(i) for i in range(ROWS)}
    _write_source(s3fs_, f"{name}/corpus", rows)
    job = _job_dir(
        tmp_path,
        cluster,
        name,
        model={"latency_ms": 15.0},
        embed={"placement_timeout_s": 10},  # ~1 s a chunk
    )
    client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth)
    submitted = client.submit_job(
        entrypoint="python jobs/backfill.py --config embray.yaml --json", runtime_env={"working_dir": str(job)}
    )
    cache = f"embray/store/{name}/cache"
    deadline = time.monotonic() + 240
    while True:  # until some chunks are in the vector cache: the pool is embedding on the worker node
        s3fs_.invalidate_cache()
        if s3fs_.exists(cache) and len([p for p in s3fs_.find(cache) if p.endswith(".parquet")]) >= 2:
            break
        state = client.get_job_status(submitted)
        assert state in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(submitted)[-3000:]
        assert time.monotonic() < deadline, "the backfill never started embedding"
        time.sleep(0.2)
    cluster.kill_worker()
    killed = time.monotonic()
    while (status := client.get_job_status(submitted)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        assert time.monotonic() - killed < 180, "the job hung after its embedding node was lost"
        time.sleep(1)
    failed_after = time.monotonic() - killed
    logs = client.get_job_logs(submitted)
    assert status == JobStatus.FAILED, logs[-3000:]
    assert "the embedding stage lost its node" in logs and "accelerator: 1" in logs, logs[-3000:]
    assert failed_after < 120
    s3fs_.invalidate_cache()
    versions = f"embray/store/{name}/versions"
    assert not s3fs_.exists(versions) or not [p for p in s3fs_.ls(versions) if s3fs_.exists(f"{p}/manifest.json")]

    cluster.start_worker()  # the node is back: the rerun embeds only what the lost one had not finished
    status, logs, _ = _submit(cluster, job, "jobs/backfill.py --config embray.yaml --json")
    assert status == "SUCCEEDED", logs[-3000:]
    out = _last_json(logs)
    assert out["rows"] == ROWS and out["cache_hits"] >= 2 * BATCH and out["embedded"] == ROWS - out["cache_hits"]
    print(f"node lost: the job failed {failed_after:.0f} s after; the rerun reused {out['cache_hits']} cached rows")
