"""S3 as it really behaves: throttling, 500s, connections reset mid-body, latency and ambiguous writes.

A fault-injecting proxy (tests/faulty_s3.py) sits between embray and moto's server. With a few percent of
requests failing, every flow must retry its way to exactly what a fault-free run produces; with every
write failing it must fail with one clear message and leave no version; a write that landed but was
reported failed must be recognised as embray's own when its retry meets 412; a torn download is never used.
"""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from embray import Collection
from embray.errors import ConflictError, StoreError
from embray.lifecycle.versions import list_versions, read_manifest
from embray.models import ModelSpec
from embray.storage.store import Store

from .faulty_s3 import FaultyS3
from .helpers import assert_same_content, content, make_config, mutate, write_corpus

# About 5% of requests fail (503 SlowDown, 500 InternalError, a reset part-way through the response);
# 5% more are slowed down.
FIVE_PERCENT = {"slowdown": 0.02, "internal": 0.015, "reset": 0.015, "latency": 0.05, "latency_s": 0.02}


@pytest.fixture
def faulty(s3):
    """A fault-free FaultyS3 proxy in front of moto; tests turn faults on with ``proxy.set``."""
    endpoint, _, _ = s3
    with FaultyS3(endpoint, seed=13) as proxy:
        yield proxy


def s3_config(tmp_path, bucket: str, prefix: str, options: dict):
    """A hash-backend collection with corpus and store under ``s3://bucket/prefix``; MLflow on local sqlite."""
    (tmp_path / prefix).mkdir(exist_ok=True)
    return make_config(
        tmp_path / prefix,
        source={"uri": f"s3://{bucket}/{prefix}/corpus", "storage_options": options},
        store={"uri": f"s3://{bucket}/{prefix}/embray", "storage_options": options},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path}/{prefix}/mlflow.db"},
    )


def write_corpus_rows(fs, root: str, rows: dict, files: int = 2) -> None:
    """Replace the corpus under ``root`` (on moto, not through the proxy) with ``files`` files holding ``rows``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in fs.find(root):
        fs.rm(f)
    items = sorted(rows.items())
    for f in range(files):
        part = items[f::files]
        with fs.open(f"{root}/part-{f:05d}.parquet", "wb") as fh:
            pq.write_table(pa.table({"id": [i for i, _ in part], "text": [t for _, t in part]}), fh)
    fs.invalidate_cache()


def run_flows(cfg, fs, root: str, rows: dict) -> dict:
    """Backfill, refresh after a change, migrate, verify, search, status; what each produced, version ids aside."""
    col = Collection(cfg)
    v1 = col.backfill()
    changed, inserted, _, _ = mutate(rows, 5, 4, 3)
    write_corpus_rows(fs, root, changed)
    st = col.status()  # v1 is now stale: 5 new, 4 changed, 3 deleted
    child = col.refresh()
    cand = col.migrate(ModelSpec(backend="hash", name="words", dims=64, seed=5))
    queries = [changed[i] for i in sorted(changed)[:: len(changed) // 8]] + [changed[sorted(inserted)[0]]]
    versions = [v1.version, child.version, cand.version]
    return {
        "counts": [r.counts.to_dict() for r in (v1, child, cand)],
        "digests": [read_manifest(col.store, "docs", v).content_digest for v in versions],
        "content": [content(cfg, v) for v in versions],
        "problems": [col.verify(v).problems for v in versions],
        "staleness": (st.staleness.new, st.staleness.changed, st.staleness.deleted, st.consistent),
        "hits": [[(h.id, round(h.score, 5)) for h in hits] for hits in col.index(child.version).search_text(queries)],
        "cand_hits": [[h.id for h in hits] for hits in col.index(cand.version).search_text(queries[:3])],
    }


@pytest.mark.slow  # about two minutes on 2 CPUs: the flows run twice, one run through the faults
@pytest.mark.usefixtures("ray_local")
def test_five_percent_faults_give_exactly_the_fault_free_result(tmp_path, bucket, faulty):
    name, options, fs = bucket
    rows = write_corpus(f"{name}/clean/corpus", files=2, rows=60, fs=fs)
    write_corpus(f"{name}/faulty/corpus", files=2, rows=60, fs=fs)
    clean = run_flows(s3_config(tmp_path, name, "clean", options), fs, f"{name}/clean/corpus", rows)

    faulty.set(**FIVE_PERCENT)
    got = run_flows(
        s3_config(tmp_path, name, "faulty", faulty.storage_options(options)), fs, f"{name}/faulty/corpus", rows
    )
    faulty.set(slowdown=0, internal=0, reset=0, latency=0)

    injected, total = faulty.injected, sum(faulty.requests.values())
    assert all(injected[k] > 0 for k in ("slowdown", "internal", "reset", "latency")), injected
    assert 0.02 < (injected["slowdown"] + injected["internal"] + injected["reset"]) / total < 0.1, (injected, total)
    assert got["problems"] == [[], [], []]
    assert got["counts"] == clean["counts"] and got["digests"] == clean["digests"]
    for a, b in zip(got["content"], clean["content"], strict=True):
        assert_same_content(a, b)
    assert got["staleness"] == clean["staleness"] == (5, 4, 3, True)
    assert got["hits"] == clean["hits"] and got["cand_hits"] == clean["cand_hits"]


@pytest.mark.usefixtures("ray_local")
def test_every_write_failing_fails_once_clearly_and_leaves_no_version(tmp_path, bucket, faulty):
    name, options, fs = bucket
    write_corpus(f"{name}/w/corpus", files=2, rows=30, fs=fs)
    # Few botocore attempts, so that the test is quick; s3fs still retries SlowDown itself.
    fast = {**faulty.storage_options(options), "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 2}}}
    cfg = s3_config(tmp_path, name, "w", fast)
    faulty.set(fail_writes=True)
    with pytest.raises(StoreError, match=r"not reachable or not writable .*reduce your request rate") as info:
        Collection(cfg).backfill()
    assert "\n" not in str(info.value)
    # One write tried (the store probe): 3 botocore attempts (max_attempts counts retries), each 5 times by s3fs.
    assert faulty.injected["fail_writes"] == faulty.requests["PUT"] == 15
    faulty.set(fail_writes=False)
    assert list_versions(Store(cfg.store.uri, options), "docs") == []
    assert not [k for k in fs.find(f"{name}/w/embray") if k.endswith("manifest.json")]


@pytest.mark.usefixtures("ray_local")
def test_every_write_failing_is_one_line_from_the_cli(tmp_path, bucket, faulty, capsys):
    import yaml

    from embray.cli import main

    name, options, fs = bucket
    write_corpus(f"{name}/c/corpus", files=1, rows=10, fs=fs)
    # Few botocore attempts, as above (the default's 5 attempts make it about half a minute: README).
    proxied = {**faulty.storage_options(options), "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 2}}}
    path = tmp_path / "embray.yaml"
    conf = {
        "collection": "docs",
        "source": {"uri": f"s3://{name}/c/corpus", "storage_options": proxied},
        "store": {"uri": f"s3://{name}/c/embray", "storage_options": proxied},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "model": {"backend": "hash", "name": "words", "dims": 64},
    }
    path.write_text(yaml.safe_dump(conf))
    faulty.set(fail_writes=True)
    with pytest.raises(SystemExit) as exit_:
        main(["backfill", "--config", str(path)])
    faulty.set(fail_writes=False)
    out = capsys.readouterr()
    assert exit_.value.code == 1 and out.out == ""
    assert out.err.count("\n") == 1 and out.err.startswith(
        f"error: store s3://{name}/c/embray is not reachable or not writable"
    ), out.err
    assert faulty.injected["fail_writes"] == faulty.requests["PUT"] == 15  # the store probe alone
    assert list_versions(Store(f"s3://{name}/c/embray", options), "docs") == []


def test_retries_are_configured_through_storage_options(bucket, faulty):
    name, options, fs = bucket
    fs.pipe_file(f"{name}/r/x", b"payload")
    default = Store(f"s3://{name}/r", faulty.storage_options(options))
    once = Store(
        f"s3://{name}/r",
        {
            **faulty.storage_options(options),
            "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 1}},
        },
    )
    assert default.fs is not once.fs
    faulty.script("internal", "internal", method="GET")
    assert default.read_bytes("x") == b"payload"  # retried by botocore
    faulty.script("internal", method="GET")
    with pytest.raises(StoreError, match="InternalError|internal error"):
        once.read_bytes("x")  # one attempt: the 500 surfaces
    assert faulty.injected["internal"] == 3


def test_an_ambiguous_create_only_write_is_recognised_as_our_own(bucket, faulty):
    name, options, fs = bucket
    store = Store(f"s3://{name}/a", faulty.storage_options(options))
    # The PUT (If-None-Match: *) lands, the client is told 500, botocore retries, and the retry meets 412.
    faulty.script("ambiguous", method="PUT")
    store.create_exclusive("docs/versions/v1/manifest.json", b'{"version": "v1"}')
    assert faulty.injected["ambiguous"] == 1 and faulty.requests["PUT"] == 2
    assert fs.cat_file(f"{name}/a/docs/versions/v1/manifest.json") == b'{"version": "v1"}'
    # A real conflict is still one: other bytes, whether or not the write was ambiguous.
    with pytest.raises(ConflictError, match="already exists"):
        store.create_exclusive("docs/versions/v1/manifest.json", b'{"version": "other"}')
    faulty.script("ambiguous", method="PUT")
    store.create_exclusive("docs/versions/v2/manifest.json", b"two")
    with pytest.raises(ConflictError, match="already exists"):
        store.create_exclusive("docs/versions/v2/manifest.json", b"not two")
    assert faulty.injected["ambiguous"] == 2


@pytest.mark.usefixtures("ray_local")
def test_a_build_whose_lease_and_manifest_writes_are_ambiguous_commits_its_version(tmp_path, bucket, faulty):
    name, options, fs = bucket
    write_corpus(f"{name}/m/corpus", files=2, rows=30, fs=fs)
    cfg = s3_config(tmp_path, name, "m", faulty.storage_options(options))
    faulty.script("ambiguous", method="PUT", path="/_locks/writer/g")  # the lease claim lands, reported failed
    faulty.script("ambiguous", method="PUT", path="/manifest.json")  # so does the commit
    col = Collection(cfg)
    v = col.backfill()
    assert faulty.injected["ambiguous"] == 2
    assert [m.version for m in list_versions(Store(cfg.store.uri, options), "docs")] == [v.version]
    assert col.verify(v.version).ok and col.aliases() == {"active": v.version}


def test_a_torn_download_is_retried_and_never_left_in_place(tmp_path, bucket, faulty):
    name, options, fs = bucket
    # A block size under the file's size: s3fs fetches the file in ranged parts, and retries no part itself.
    store = Store(f"s3://{name}/d", {**faulty.storage_options(options), "default_block_size": 2**20})
    data = np.random.default_rng(0).bytes(3_000_000)
    sha = hashlib.sha256(data).hexdigest()
    fs.pipe_file(f"{name}/d/blob", data)
    dest = tmp_path / "got" / "blob"
    dest.parent.mkdir()
    faulty.script("internal", "reset", "reset", method="GET")  # the first GET (size) is retried by botocore
    store.download("blob", dest, sha256=sha, size=len(data))
    assert dest.read_bytes() == data and faulty.injected["reset"] == 2
    assert list(dest.parent.iterdir()) == [dest]  # no temporary file left beside it

    # Every read cut part-way: one clear error, and nothing at the destination, not even a full-size file.
    faulty.set(reset=1.0, only="reads")
    with pytest.raises(StoreError, match=r"cannot download s3://.*/d/blob whole after 4 attempts: .*payload"):
        store.download("blob", dest.parent / "torn", sha256=sha, size=len(data))
    faulty.set(reset=0.0, only=None)
    assert list(dest.parent.iterdir()) == [dest]

    # Whole bytes that are not the manifest's are not used either.
    with pytest.raises(StoreError, match=rf"expected 3000000 bytes with sha256 {'0' * 64}"):
        store.download("blob", dest.parent / "other", sha256="0" * 64, size=len(data))
    assert list(dest.parent.iterdir()) == [dest]


@pytest.mark.usefixtures("ray_local")
def test_a_version_loads_for_search_through_resets_as_a_replica_does(tmp_path, bucket, faulty):
    name, options, fs = bucket
    rows = write_corpus(f"{name}/s/corpus", files=2, rows=80, fs=fs)
    cfg = s3_config(tmp_path, name, "s", options)
    col = Collection(cfg)
    v = col.backfill().version
    queries = [rows[i] for i in sorted(rows)[::10]]
    want = [[(h.id, h.score) for h in hits] for hits in col.index(v).search_text(queries)]

    # A replica on another machine: an empty cache, every read through the proxy, a quarter of them cut
    # part-way; small blocks, so that every shard file is fetched in ranged parts.
    shutil.rmtree(tmp_path / "cache")
    opts = {**faulty.storage_options(options), "default_block_size": 4096}
    replica = Collection(cfg.model_copy(update={"store": cfg.store.model_copy(update={"storage_options": opts})}))
    faulty.set(reset=0.25, only="reads")
    got = [[(h.id, h.score) for h in hits] for hits in replica.index(v).search_text(queries)]
    faulty.set(reset=0.0, only=None)
    assert faulty.injected["reset"] > 0
    assert got == want
