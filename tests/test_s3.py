"""The S3 path: a corpus and a store on moto's S3 server, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import pytest

from embray.errors import ConflictError
from embray.flows import backfill
from embray.search import open_version
from embray.store import Store
from embray.versions import list_versions, read_manifest

from .conftest import doc_text, make_config, write_corpus

pytestmark = pytest.mark.usefixtures("ray_local")


def test_backfill_from_s3_to_s3_and_search(tmp_path, bucket):
    name, options, fs = bucket
    corpus = write_corpus(f"{name}/corpus", files=4, rows=60, fs=fs)
    cfg = make_config(
        tmp_path,
        source={"uri": f"s3://{name}/corpus", "storage_options": options},
        store={"uri": f"s3://{name}/embray", "storage_options": options},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    result = backfill(cfg)
    assert result.rows == 240 and result.uri == f"s3://{name}/embray/docs/versions/{result.version}"
    store = Store(cfg.store.uri, options)
    assert [m.version for m in list_versions(store, "docs")] == [result.version]
    keys = fs.find(f"{name}/embray/docs/versions/{result.version}")
    assert sum(k.endswith(".usearch") for k in keys) == 3 and not any("_staging" in k for k in keys)

    vi = open_version(cfg)  # the active alias, shards downloaded, checked and memory-mapped
    assert vi.version == result.version
    target = "doc-000123"
    (hits,) = vi.search_text([corpus[target]], k=5)
    assert hits[0].id == target and hits[0].score == pytest.approx(1.0, abs=1e-2)

    # The manifest is create-only on S3 too (If-None-Match: *): a second commit is refused.
    manifest = read_manifest(store, "docs", result.version)
    with pytest.raises(ConflictError, match=r"already exists; it is never overwritten"):
        store.create_exclusive(f"docs/versions/{result.version}/manifest.json", b"{}")
    assert read_manifest(store, "docs", result.version) == manifest
    assert doc_text(123) == corpus[target]
