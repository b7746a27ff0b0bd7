"""Shared fixtures: one local Ray per session, moto's S3 server on loopback, corpus and config builders."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WORDS = (
    "river mountain forest ocean desert valley glacier canyon meadow island volcano prairie "
    "tiger falcon salmon beetle otter heron badger lizard walrus parrot bison moth "
    "copper silver marble granite amber cobalt quartz basalt nickel zinc slate iron"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def doc_text(i: int, n_words: int = 8) -> str:
    """Deterministic text for row i: overlapping vocabularies, so nearest neighbours mean something."""
    return " ".join(WORDS[(i * 7 + j * j * 3 + (i // 5) * j) % len(WORDS)] for j in range(n_words)) + f" item{i % 97}"


def write_corpus(root, files: int = 3, rows: int = 100, *, fs=None, start: int = 0, int_ids: bool = False):
    """Write ``files`` Parquet files of ``rows`` rows each; returns the {id: text} written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    for f in range(files):
        lo = start + f * rows
        ids = list(range(lo, lo + rows)) if int_ids else [f"doc-{i:06d}" for i in range(lo, lo + rows)]
        texts = [doc_text(i) for i in range(lo, lo + rows)]
        out.update(zip(ids, texts, strict=True))
        table = pa.table({"id": ids, "text": texts})
        path = f"{str(root).rstrip('/')}/part-{f:05d}.parquet"
        if fs is None:
            Path(root).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
        else:
            with fs.open(path, "wb") as fh:
                pq.write_table(table, fh)
    return out


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


def make_config(tmp_path, **over):
    """A validated Config for a hash-backend collection under tmp_path; keyword args override sections."""
    from embray.config import parse_config

    data = {
        "collection": "docs",
        "source": {"uri": str(tmp_path / "corpus")},
        "store": {"uri": str(tmp_path / "store")},
        "model": {"backend": "hash", "name": "words", "dims": 64},
        "index": {"metric": "cos", "dtype": "f16", "shards": 3},
        "embed": {"batch_size": 128, "actors": 1, "num_cpus": 1},
    }
    for key, value in over.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return parse_config(data, base_dir=tmp_path)
