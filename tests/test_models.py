import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest

from embray.errors import ModelError
from embray.models import ModelSpec, fingerprint, load_embedder, resolve_model_path

from .conftest import SHARED

HASH = ModelSpec(backend="hash", name="words", dims=64)


def test_hash_backend_is_identical_across_processes():
    texts = ["the quick brown fox", "Ünïcode text ✓", "42"]
    here = load_embedder(HASH).embed_documents(texts)
    code = (
        "import numpy as np, sys; from embray.models import ModelSpec, load_embedder; "
        "v = load_embedder(ModelSpec(backend='hash', name='words', dims=64)).embed_documents("
        "['the quick brown fox', 'Ünïcode text ✓', '42']); sys.stdout.write(v.tobytes().hex())"
    )
    env = {"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert np.frombuffer(bytes.fromhex(other), dtype=np.float32).reshape(3, 64).tobytes() == here.tobytes()
    assert (
        fingerprint(HASH)
        == subprocess.run(
            [
                sys.executable,
                "-c",
                "from embray.models import *; print(fingerprint(ModelSpec(backend='hash', name='words', dims=64)))",
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout.strip()
    )


def test_vectors_are_normalised_float32_and_prefixes_apply():
    spec = HASH.model_copy(update={"query_prefix": "query: "})
    e = load_embedder(spec)
    docs = e.embed_documents(["river otter", "copper"])
    assert docs.dtype == np.float32 and docs.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, rtol=1e-6)
    query = e.embed_queries(["river otter"])
    assert not np.allclose(query[0], docs[0])  # the prefix is part of the query text
    assert e.batches == 2 and e.rows == 3
    sim = docs @ load_embedder(HASH).embed_documents(["river otter swims"]).T
    assert sim[0, 0] > sim[1, 0]  # shared words make vectors close


def test_same_dims_different_spec_is_a_different_space():
    base = fingerprint(HASH)
    assert fingerprint(HASH.model_copy(update={"seed": 1})) != base
    assert fingerprint(HASH.model_copy(update={"document_prefix": "passage: "})) != base
    assert fingerprint(HASH.model_copy(update={"batch_size": 7, "device": "cpu"})) == base  # not semantic


def test_fingerprint_covers_the_weight_files(tmp_path):
    src = resolve_model_path(ModelSpec())
    copy = tmp_path / "minilm"
    shutil.copytree(src, copy)
    a = fingerprint(ModelSpec(name=str(copy)))
    assert a == fingerprint(ModelSpec(name=str(src)))  # same bytes, other path: same space
    assert a == fingerprint(ModelSpec(name="all-MiniLM-L6-v2"))
    with open(copy / "vocab.txt", "a") as fh:
        fh.write("newtoken\n")
    assert fingerprint(ModelSpec(name=str(copy))) != a


def test_unknown_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        fingerprint(ModelSpec(name="nobody/no-such-model"))


def _has_vllm_gpu() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_has_vllm_gpu(), reason="vLLM is installed here; the missing-package message cannot be seen")
def test_vllm_backend_without_vllm_says_how_to_get_it():
    with pytest.raises(ModelError, match=r"CUDA-only: install embray\[gpu\] on a GPU node"):
        load_embedder(ModelSpec(backend="vllm", name="all-MiniLM-L6-v2", dims=384))


@pytest.mark.gpu
@pytest.mark.skipif(not _has_vllm_gpu(), reason="vLLM is CUDA-only: needs a GPU and `pip install embray[gpu]`")
def test_vllm_backend_matches_sentence_transformers_on_gpu():
    texts = ["A man is playing a guitar.", "The stock market fell sharply today."]
    v = load_embedder(ModelSpec(backend="vllm", name="all-MiniLM-L6-v2", dims=384)).embed_documents(texts)
    s = load_embedder(ModelSpec()).embed_documents(texts)
    assert (np.sum(v * s, axis=1) > 0.99).all()


STSB = SHARED / "data" / "stsb" / "sts-test.csv"


@pytest.mark.slow
@pytest.mark.skipif(not STSB.exists(), reason=f"STS benchmark file {STSB} is absent (it lives in ../shared/)")
def test_sentence_transformers_reaches_published_stsb_score():
    from scipy.stats import spearmanr

    gold, left, right = [], [], []
    with open(STSB, newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 7:
                gold.append(float(row[4]))
                left.append(row[5])
                right.append(row[6])
    assert len(gold) > 1000
    e = load_embedder(ModelSpec())
    a, b = e.embed_documents(left), e.embed_documents(right)
    rho = spearmanr(np.sum(a * b, axis=1), gold).statistic
    assert rho >= 0.815, f"Spearman {rho:.4f} below 0.815 (published 0.8203)"
