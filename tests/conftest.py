"""Shared fixtures: one local Ray per session, moto's S3 server on loopback, an isolated cache per test.

Helpers (corpora, configs, version contents) are in tests/helpers.py."""

from __future__ import annotations

import os

import pytest

from .helpers import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, as on the development machines)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBRAY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1; yields (endpoint, storage_options, s3fs filesystem)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    fs = s3fs.S3FileSystem(**options)
    yield endpoint, options, fs
    server.stop()


@pytest.fixture
def bucket(s3, request):
    """A fresh bucket per test: returns (bucket name, storage_options, fs)."""
    import boto3

    endpoint, options, fs = s3
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid() % 1000}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    fs.invalidate_cache()
    return name, options, fs
