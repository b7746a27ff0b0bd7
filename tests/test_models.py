import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from embray.errors import ModelError
from embray.models import ModelSpec, fingerprint, load_embedder, resolve_model_path

from .helpers import STSB, docstring_pages, known_item_recall, man_pages, stsb_spearman

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


needs_stsb = pytest.mark.skipif(
    not STSB.exists(), reason=f"STS benchmark file {STSB} is absent (it lives in ../shared/)"
)


@pytest.mark.slow
@needs_stsb
def test_sentence_transformers_reaches_published_stsb_score():
    rho = stsb_spearman(load_embedder(ModelSpec()))
    assert rho >= 0.815, f"Spearman {rho:.4f} below 0.815 (published 0.8203)"


# --- onnx backend -------------------------------------------------------------------------------------------

ONNX_INT8 = ModelSpec(backend="onnx")
ONNX_FP32 = ModelSpec(backend="onnx", quantize="none")


def test_existing_fingerprints_do_not_change():
    # Values computed before the onnx backend (and its `quantize` field) existed: every stored version names
    # these, so a new spec field must never move them.
    assert fingerprint(HASH) == "fbdea2efbd64cd51ef130172"
    assert fingerprint(ModelSpec()) == "2b621ef4322a93cda7861177"
    assert fingerprint(ModelSpec(max_tokens=128, dims=384, query_prefix="query: ")) == "b5b2df9e86dd210b214cbdb2"


def test_onnx_fingerprints_differ_from_their_source_and_each_other(monkeypatch):
    import embray.models.spec as spec

    st, int8, fp32 = fingerprint(ModelSpec()), fingerprint(ONNX_INT8), fingerprint(ONNX_FP32)
    assert len({st, int8, fp32}) == 3
    assert fingerprint(ModelSpec(backend="onnx", quantize="int8")) == int8  # int8 is the default
    assert ONNX_INT8.canonical()["export"].startswith("embray-onnx-v")
    monkeypatch.setattr(spec, "ONNX_RECIPE", spec.ONNX_RECIPE + " (changed)")
    assert fingerprint(ONNX_INT8) != int8  # another export recipe is another space


def test_quantize_is_refused_outside_the_onnx_backend():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"quantize: int8 applies only to backend: onnx"):
        ModelSpec(backend="sentence-transformers", quantize="int8")


def test_onnx_backend_without_onnxruntime_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(ModelError, match=r"pip install 'embray\[onnx\]'"):
        load_embedder(ONNX_INT8)


def test_onnx_backend_reads_the_sentence_transformers_layout(tmp_path):
    from embray.models.onnx import _st_layout

    (tmp_path / "1_Pooling").mkdir()
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": True}))
    assert _st_layout(tmp_path) == (tmp_path, "cls", 128, True)
    legacy = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(legacy))
    assert _st_layout(tmp_path).pooling == "mean"
    older = [{**modules[0], "path": "0_Transformer"}, modules[1]]  # older models keep the transformer in a folder
    (tmp_path / "modules.json").write_text(json.dumps(older))
    assert _st_layout(tmp_path) == (tmp_path / "0_Transformer", "mean", None, False)
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "max"}))
    with pytest.raises(ModelError, match=r"pooling 'max' is not supported by the onnx backend"):
        _st_layout(tmp_path)
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    (tmp_path / "modules.json").write_text(json.dumps([*modules, dense]))
    with pytest.raises(ModelError, match=r"module 'Dense' is not run by the onnx backend"):
        _st_layout(tmp_path)


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    """One export (fp32, then int8 from it) per test session, in a cache of its own: (cache dir, models)."""
    cache = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBRAY_CACHE", str(cache))
        models = {"int8": load_embedder(ONNX_INT8), "none": load_embedder(ONNX_FP32)}
    return cache, models


@pytest.fixture(scope="session")
def minilm():
    return load_embedder(ModelSpec())


TEXTS = [
    "A man is playing a guitar.",
    "The stock market fell sharply today after the central bank raised interest rates by half a point.",
    "Ünïcode text ✓",
    "x",
    "otter " * 400,  # longer than the model's 256 tokens: truncated like sentence-transformers does
]


@pytest.mark.slow
def test_onnx_vectors_agree_with_sentence_transformers(onnx_cache, minilm):
    _, models = onnx_cache
    ref = minilm.embed_documents(TEXTS)
    for quantize, floor in (("none", 0.9999), ("int8", 0.97)):
        vecs = models[quantize].embed_documents(TEXTS)
        assert vecs.dtype == np.float32 and vecs.shape == (len(TEXTS), 384)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
        cos = np.sum(vecs * ref, axis=1)
        assert cos.min() >= floor, f"{quantize}: cosine vs sentence-transformers {np.round(cos, 5)}"
    # A text's vector does not depend on the texts beside it (int8 activation scales are per text).
    for quantize in ("none", "int8"):
        together = models[quantize].embed_documents(TEXTS)
        alone = np.vstack([models[quantize].embed_documents([t]) for t in TEXTS])
        np.testing.assert_allclose(together, alone, atol=1e-6)


@pytest.mark.slow
def test_onnx_export_is_cached_and_not_redone(onnx_cache, monkeypatch):
    import torch

    import embray.models.onnx as onnx

    cache, loaded = onnx_cache
    monkeypatch.setenv("EMBRAY_CACHE", str(cache))
    files = sorted((cache / "onnx").rglob("*"))
    assert [f.name for f in files if f.is_file()] == ["model-int8.onnx", "model-none.onnx"]  # no temporaries left
    assert loaded["int8"].path.name == "model-int8.onnx" and loaded["none"].path.name == "model-none.onnx"
    stamps = {f: f.stat().st_mtime_ns for f in files}

    def refuse(*args):
        raise AssertionError("exported again although the cache holds the model")

    monkeypatch.setattr(onnx, "_export_onnx", refuse)
    monkeypatch.setattr(onnx, "_quantize_int8", refuse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU Serve replica
    try:
        again = load_embedder(ONNX_INT8)
    finally:
        torch.set_num_threads(threads)
    assert again.path == loaded["int8"].path
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert again.session.get_session_options().intra_op_num_threads == 1
    np.testing.assert_array_equal(again.embed_queries(TEXTS[:2]), loaded["int8"].embed_queries(TEXTS[:2]))


@pytest.mark.slow
@needs_stsb
@pytest.mark.parametrize("quantize, floor", [("none", 0.815), ("int8", 0.81)])
def test_onnx_stsb_score(onnx_cache, quantize, floor):
    rho = stsb_spearman(onnx_cache[1][quantize])
    assert rho >= floor, f"onnx ({quantize}) Spearman {rho:.4f} below {floor}"


# --- precision (sentence-transformers on CUDA) --------------------------------------------------------------


@pytest.mark.parametrize("backend", ["hash", "onnx", "vllm"])
def test_precision_is_refused_outside_sentence_transformers(backend):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"precision: fp16 applies only to backend: sentence-transformers"):
        ModelSpec(backend=backend, dims=384, precision="fp16")
    with pytest.raises(ValidationError):
        ModelSpec(precision="int8")


def test_precision_is_a_compute_setting_not_a_space():
    # A version built on a GPU in fp16 is served and audited by CPU replicas in fp32: one space, one fingerprint.
    assert "precision" not in ModelSpec(precision="fp16").canonical()
    assert {fingerprint(ModelSpec(precision=p)) for p in (None, "fp32", "fp16", "bf16")} == {"2b621ef4322a93cda7861177"}


@pytest.mark.parametrize("native_bf16", [True, False])
def test_reduced_precision_where_the_device_computes_it(caplog, monkeypatch, native_bf16):
    import torch

    import embray.models.sentence_transformers as st

    monkeypatch.setattr(st, "cpu_has_bf16", lambda: native_bf16)
    assert st._compute_dtype(None, "cuda") is torch.float32
    assert st._compute_dtype("fp32", "cuda") is torch.float32
    assert st._compute_dtype("fp16", "cuda") is torch.float16
    assert st._compute_dtype("bf16", "cuda") is torch.bfloat16
    assert st._compute_dtype(None, "cpu") is torch.float32
    with caplog.at_level("WARNING", logger="embray"):
        assert st._compute_dtype("fp16", "cpu") is torch.float32
        assert st._compute_dtype("bf16", "mps") is torch.float32
        assert st._compute_dtype("bf16", "cpu") is (torch.bfloat16 if native_bf16 else torch.float32)
    assert "model.precision fp16 applies on CUDA (bf16: also on CPU); running in fp32 on cpu" in caplog.text
    assert ("needs a CPU with AMX or AVX512-BF16" in caplog.text) is not native_bf16


@pytest.mark.parametrize(
    ("var", "value", "capped"),
    [
        ("ONEDNN_MAX_CPU_ISA", "AVX2", True),
        ("DNNL_MAX_CPU_ISA", "avx512_core", True),
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", False),
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX", False),
        ("ONEDNN_MAX_CPU_ISA", "ALL", False),
    ],
)
def test_an_instruction_set_cap_counts_as_a_cpu_without_bf16(monkeypatch, var, value, capped):
    import embray.models.sentence_transformers as st

    # torch's cpuinfo probes ignore the caps: under ONEDNN_MAX_CPU_ISA=AVX2 bf16 is emulated, ~5x slower than fp32
    monkeypatch.setenv(var, value)
    assert (st.bf16_capped() == f"{var}={value.upper()}") is capped
    if capped:
        assert st.cpu_has_bf16() is False
        assert f"capped by {var}={value}" in st.cpu_isa() and "BF16" not in st.cpu_isa().split(",")[0]
        why = st._dtype_why("bf16", st._compute_dtype("bf16", "cpu"))
        assert why.startswith("bf16 not native on this CPU") and "fp32 computes the same space" in why


def test_the_compute_path_names_the_cpu_and_why(monkeypatch):
    import torch

    import embray.models.sentence_transformers as st

    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(var, raising=False)
    isa = st.cpu_isa()
    assert isa.split(" +")[0].split()[-1] == torch.backends.cpu.get_cpu_capability() and "capped" not in isa
    assert ("+BF16" in isa or "+AMX" in isa) is st.cpu_has_bf16()
    assert st._dtype_why("bf16", torch.bfloat16) == f"bf16 native on this CPU: {isa}"
    assert st._dtype_why(None, torch.float32) == f"model.precision fp32; CPU {isa}"


@pytest.mark.slow
def test_only_wide_batches_run_fused_at_a_few_widths_with_the_same_vectors(minilm):
    from embray.models.cpu_graph import FUSE_FROM, MIN_BATCH

    # each compiled shape keeps its oneDNN state for the life of the process: texts of every length compile
    # at most one shape per fused width (MiniLM: its window, 256) and the narrow batches run unoptimised
    enc = load_embedder(ModelSpec(device="cpu")).fused
    assert enc is not None and enc.widths == [256]
    assert enc.narrow_tokens == 1024  # fp32: unfused batches of at most 1,024 tokens (bf16: 2,048, the same bytes)
    texts = [" ".join(["word"] * n) for n in range(4, 300, 3) for _ in range(MIN_BATCH + 1)]
    enc.calls, enc.shapes = {"graph": 0, "plain": 0}, set()
    got = enc.encode(texts, batch_size=64)
    assert {w for _, w in enc.shapes} == {256} and enc.calls["graph"] >= 2 and enc.calls["plain"] > 3
    assert enc.width(FUSE_FROM - 1) == FUSE_FROM - 1 and enc.width(FUSE_FROM) == 256 and enc.width(256) == 256
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    assert np.sum(got * minilm.embed_documents(texts), axis=1).min() >= 0.9999


def test_fused_widths_are_few_and_end_at_the_window():
    from embray.models.cpu_graph import fused_widths

    # the window, then its halves down to FUSE_FROM (160): a batch is padded to at most twice its tokens
    assert fused_widths(256) == [256] and fused_widths(512) == [256, 512] and fused_widths(384) == [192, 384]
    assert fused_widths(200) == [200] and fused_widths(100) == [104] and fused_widths(1024) == [256, 512, 1024]


@pytest.mark.slow
def test_fp16_spec_on_a_cpu_gives_the_fp32_vectors(minilm, caplog):
    with caplog.at_level("WARNING", logger="embray"):
        e = load_embedder(ModelSpec(device="cpu", precision="fp16"))
    assert "running in fp32 on cpu" in caplog.text
    assert e.dtype == minilm.dtype
    np.testing.assert_array_equal(e.embed_documents(TEXTS), minilm.embed_documents(TEXTS))


@pytest.mark.slow
def test_weights_stored_in_fp16_are_computed_in_fp32(tmp_path, minilm):
    # transformers >= 5 loads a checkpoint in its stored dtype; the spec's precision (null: fp32) decides instead.
    import torch
    from safetensors.torch import load_file, save_file

    src = resolve_model_path(ModelSpec())
    copy = tmp_path / "minilm-fp16"
    shutil.copytree(src, copy)
    weights = load_file(str(src / "model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in weights.items()}, str(copy / "model.safetensors"))
    e = load_embedder(ModelSpec(name=str(copy), device="cpu"))
    assert e.dtype is torch.float32 and (e.compute.path, e.compute.dtype) == ("cpu-graph", "fp32")
    assert "traced" in e.compute.why and e.model is None  # traced from it, then sentence-transformers' copy freed
    vecs = e.embed_documents(TEXTS)
    assert vecs.dtype == np.float32
    assert np.sum(vecs * minilm.embed_documents(TEXTS), axis=1).min() > 0.99999


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision, dtype", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_reduced_precision_on_cuda_returns_float32_close_to_fp32(precision, dtype):
    import torch

    fp32 = load_embedder(ModelSpec(device="cuda")).embed_documents(TEXTS)
    e = load_embedder(ModelSpec(device="cuda", precision=precision))
    assert next(e.model.parameters()).dtype is getattr(torch, dtype)
    vecs = e.embed_documents(TEXTS)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    assert np.sum(vecs * fp32, axis=1).min() > 0.999


# --- bf16 on a CPU that computes it natively (AMX / AVX512-BF16): the recommended CPU setting ------------------


def _cpu_bf16() -> bool:
    from embray.models.sentence_transformers import cpu_has_bf16

    return cpu_has_bf16()


needs_cpu_bf16 = pytest.mark.skipif(not _cpu_bf16(), reason="needs a CPU with AMX or AVX512-BF16 (native bf16)")


@pytest.fixture(scope="module")
def minilm_bf16():
    return load_embedder(ModelSpec(device="cpu", precision="bf16"))


@pytest.mark.slow
@needs_cpu_bf16
def test_bf16_on_cpu_gives_one_vector_per_text_whatever_its_batch(minilm_bf16, minilm):
    import torch

    e = minilm_bf16
    assert e.dtype is torch.bfloat16 and e.fused is not None  # the fused CPU graph, traced in bf16
    pages = man_pages(40) or [(str(i), t, t * 20) for i, t in enumerate(TEXTS)]
    texts = [*TEXTS, *(body for _, _, body in pages)]  # 1 to 256 tokens: batches pad the short ones a lot
    alone = np.stack([e.embed_documents([t])[0] for t in texts])
    assert alone.dtype == np.float32
    rng, spec = np.random.default_rng(0), e.spec
    for batch_size in (2, 7, 64):
        order = rng.permutation(len(texts))  # other neighbours, other padding, other batch shapes
        e.spec = e.spec.model_copy(update={"batch_size": batch_size})
        batched = e.embed_documents([texts[i] for i in order])
        cos = np.sum(batched * alone[order], axis=1)
        assert cos.min() >= 0.9999, f"batch_size {batch_size}: a text's vector moved to cosine {cos.min():.6f}"
    e.spec = spec
    # the same space as fp32: a CPU without bf16 serves and audits a bf16-built version in fp32
    assert np.sum(alone * minilm.embed_documents(texts), axis=1).min() >= 0.999


@pytest.mark.slow
@needs_stsb
@needs_cpu_bf16
def test_bf16_on_cpu_keeps_stsb(minilm_bf16):
    rho = stsb_spearman(minilm_bf16)
    assert rho >= 0.815, f"bf16 Spearman {rho:.4f} below 0.815"


@pytest.mark.slow
@needs_cpu_bf16
@pytest.mark.parametrize("corpus", ["man pages", "stdlib docstrings"])
def test_bf16_on_cpu_retrieves_as_well_as_fp32(minilm_bf16, minilm, corpus):
    # Known-item retrieval on two kinds of text: prose documentation (man pages: NAME line -> page) and API
    # reference (docstrings: summary line -> the rest). STS-B alone hides retrieval losses.
    n = 300  # one item = 0.33 pt of recall: the 1 pt tolerance is three items
    pages = man_pages(n) if corpus == "man pages" else docstring_pages(n)
    if len(pages) < n:
        pytest.skip(f"{corpus}: found {len(pages)} of {n} pages on this machine")
    fp32, bf16 = known_item_recall(minilm, pages), known_item_recall(minilm_bf16, pages)
    assert fp32 > 0.5, f"the {corpus} set is broken: fp32 recall@10 {fp32:.3f}"
    assert bf16 >= fp32 - 0.01, f"{corpus}: bf16 recall@10 {bf16:.3f} vs fp32 {fp32:.3f}"


# --- the fused CPU graph (embray.models.cpu_graph) ---------------------------------------------------------------


def _st_plain(spec: ModelSpec, monkeypatch):
    """The same model through sentence-transformers' own encode (the fused graph switched off)."""
    with monkeypatch.context() as mp:
        mp.setenv("EMBRAY_CPU_GRAPH", "0")
        e = load_embedder(spec)
    assert e.fused is None and e.model is not None
    return e


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_cpu_graph_gives_sentence_transformers_tokens_and_vectors(precision, monkeypatch):
    from embray.models.cpu_graph import MIN_BATCH
    from embray.models.sentence_transformers import cpu_has_bf16

    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("needs a CPU with AMX or AVX512-BF16 (native bf16)")
    spec = ModelSpec(device="cpu", precision=precision)
    fused, plain = load_embedder(spec), _st_plain(spec, monkeypatch)
    assert fused.fused is not None
    texts = [*TEXTS, *(b for _, _, b in man_pages(40)), *(f"{s} {r}" for _, s, r in docstring_pages(60))]
    assert fused.fused.layout.cut == 8 * 256 and max(map(len, texts)) > 10_000  # long pages tokenised from a prefix
    # and where the prefix holds fewer tokens than the limit (120-letter words: one [UNK] each), or has no
    # space to cut at, the whole text
    texts += [("word" * 30 + " ") * 30, "x" * 5000 + " tail", "line one\r\nline two " * 300]
    # the same token ids as sentence-transformers, text by text (truncation, lower case, special tokens)
    for t in texts:
        ids, _, _ = fused.fused.tokens.tensors(fused.fused.tokens.encodings([t]))
        assert ids[0].tolist() == plain.model.tokenize([t])["input_ids"][0].tolist(), t[:60]
    got, want = fused.embed_documents(texts), plain.embed_documents(texts)
    assert fused.fused.calls["graph"] >= 1  # the batches of man pages ran fused
    cos = np.sum(got * want, axis=1)
    assert cos.min() >= 0.9999, f"{precision}: cosine to sentence-transformers {cos.min():.6f}"
    # a query (fewer than MIN_BATCH texts) runs the same graph unoptimised, to the same vector
    before = fused.fused.calls["plain"]
    alone = np.stack([fused.embed_queries([t])[0] for t in texts[: MIN_BATCH + 2]])
    assert fused.fused.calls["plain"] == before + MIN_BATCH + 2
    assert np.sum(alone * got[: MIN_BATCH + 2], axis=1).min() >= 0.9999


@pytest.mark.slow
def test_the_cpu_graph_is_cached_and_then_loads_without_sentence_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBRAY_CACHE", str(tmp_path / "cache"))
    first = load_embedder(ModelSpec(device="cpu"))
    assert first.fused is not None and "traced" in first.compute.why  # traced from the loaded model, then saved
    assert first.model is None  # the frozen graph holds the weights: sentence-transformers' model is let go
    saved = list((tmp_path / "cache" / "cpu-graph").glob("*/graph.pt"))
    assert len(saved) == 1 and (saved[0].parent / "meta.json").is_file()
    probe = (
        "import json, sys; from embray.models import ModelSpec, load_embedder; "
        "e = load_embedder(ModelSpec(device='cpu')); "
        "print(json.dumps({'fused': e.fused is not None, 'st': e.model is not None, "
        "'imported': sorted(m for m in ('sentence_transformers', 'transformers') if m in sys.modules), "
        "'vecs': e.embed_documents(json.loads(sys.argv[1])).tolist()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(TEXTS)], capture_output=True, text=True, check=True, env=_env(tmp_path)
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["fused"] and not got["st"] and got["imported"] == []
    assert np.sum(np.array(got["vecs"]) * first.embed_documents(TEXTS), axis=1).min() >= 0.99999


def _env(tmp_path) -> dict:
    import os

    return {**os.environ, "EMBRAY_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_a_damaged_cached_graph_is_made_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EMBRAY_CACHE", str(tmp_path / "cache"))
    want = load_embedder(ModelSpec(device="cpu")).embed_documents(TEXTS)
    (graph,) = (tmp_path / "cache" / "cpu-graph").glob("*/graph.pt")
    graph.write_bytes(b"not a graph")
    with caplog.at_level("WARNING", logger="embray"):
        e = load_embedder(ModelSpec(device="cpu"))
    assert "ignoring the cached CPU graph" in caplog.text
    assert e.fused is not None and "traced" in e.compute.why  # made again from the model, and saved again
    assert graph.stat().st_size > 1000
    assert np.sum(e.embed_documents(TEXTS) * want, axis=1).min() >= 0.99999
    (graph.parent / "meta.json").unlink()  # partly deleted: made again too, not left to be remade on every load
    assert "traced" in load_embedder(ModelSpec(device="cpu")).compute.why
    assert (graph.parent / "meta.json").is_file()
    assert "from the local cache" in load_embedder(ModelSpec(device="cpu")).compute.why


@pytest.mark.slow
def test_a_graph_that_disagrees_with_the_model_is_never_used(monkeypatch, caplog):
    import torch

    import embray.models.cpu_graph as cg

    class Wrong(torch.nn.Module):  # what a bad trace could do: the right shape, other numbers
        def forward(self, ids, mask, types):
            return torch.rand(ids.shape[0], ids.shape[1], 384)

    monkeypatch.setattr(cg, "_trace", lambda transformer, types: torch.jit.script(Wrong()))
    with caplog.at_level("WARNING", logger="embray"):
        e = load_embedder(ModelSpec(device="cpu"))
    assert "its vectors differ from sentence-transformers'" in caplog.text
    assert e.fused is None and not list(cg.local_cache_root().glob("cpu-graph/*"))  # nothing cached either
    plain = _st_plain(ModelSpec(device="cpu"), monkeypatch)
    np.testing.assert_array_equal(e.embed_documents(TEXTS), plain.embed_documents(TEXTS))


@pytest.mark.slow
def test_models_other_than_transformer_pooling_normalize_keep_sentence_transformers(monkeypatch):
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense

    import embray.models.cpu_graph as cg
    from embray.models.tokens import read_layout

    st = _st_plain(ModelSpec(device="cpu"), monkeypatch).model
    dense = SentenceTransformer(modules=[st[0], st[1], Dense(384, 16)], device="cpu")
    enc, why = cg.build(ModelSpec(device="cpu"), dense, torch.float32)
    assert enc is None and why.startswith("not a Transformer -> Pooling model")  # said in the build's compute
    assert read_layout(st).pooling == "mean"


def test_long_texts_are_tokenised_from_a_prefix_cut_at_a_space_only_where_that_keeps_the_tokens(tmp_path):
    from embray.models.tokens import prefix, splits_at_spaces

    assert prefix("short", 10) == "short"
    assert prefix("alpha beta gamma delta", 12) == "alpha beta"  # never inside a word
    assert prefix("alpha\nbeta gamma", 11) == "alpha\nbeta"
    assert prefix("a " + "x" * 40, 20) == "a " + "x" * 40  # no break in the prefix's second half: uncut

    def tokenizer(normalizer, pre_tokenizer):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps({"normalizer": normalizer, "pre_tokenizer": pre_tokenizer}))
        return path

    bert = {"type": "BertPreTokenizer"}
    assert splits_at_spaces(resolve_model_path(ModelSpec()) / "tokenizer.json")  # MiniLM's own
    assert splits_at_spaces(tokenizer({"type": "Sequence", "normalizers": [{"type": "NFD"}]}, bert))
    assert splits_at_spaces(
        tokenizer(None, {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, {"type": "Digits"}]})
    )
    # byte-level BPE keeps a word's leading space; a precompiled (sentencepiece) normalizer is opaque: uncut
    assert not splits_at_spaces(tokenizer(None, {"type": "ByteLevel"}))
    assert not splits_at_spaces(tokenizer({"type": "Precompiled"}, {"type": "Metaspace"}))
    assert not splits_at_spaces(tokenizer({"type": "Precompiled"}, bert))
    assert not splits_at_spaces(tmp_path / "missing.json")


# --- the tokenizing feed of the GPU path (embray.models.gpu; device-agnostic, so run here on the CPU) ------------


@pytest.fixture(scope="module")
def st_fp32():
    """MiniLM as a plain SentenceTransformer on the CPU, fp32 (what the feed is checked against)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(resolve_model_path(ModelSpec())), device="cpu", local_files_only=True)


@pytest.mark.slow
def test_the_gpu_feed_gives_encode_vectors_in_order_whatever_the_batch(st_fp32, monkeypatch):
    import random

    from embray.models import gpu

    monkeypatch.setenv("EMBRAY_GPU_FEED", "1")
    fed = gpu.build(st_fp32, "minilm")
    assert fed is not None and fed.layout.cut == 8 * 256
    fed.piece = 16  # several pieces a call: the next one tokenised while this one computes
    texts = [*TEXTS, *(b for _, _, b in man_pages(20)), *(f"{s} {r}" for _, s, r in docstring_pages(40))]
    texts += [("word" * 30 + " ") * 30, "x" * 5000 + " tail"]  # the prefix falls short, or has no space: uncut
    random.Random(3).shuffle(texts)
    want = st_fp32.encode(texts, normalize_embeddings=True)
    got = fed.encode(texts, batch_size=7)
    assert got.dtype == np.float32 and got.shape == (len(texts), 384)
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    assert np.sum(got * want, axis=1).min() >= 0.9999  # each text's own vector, in the order given
    alone = np.concatenate([fed.encode([t], 64) for t in texts[:12]])
    alone /= np.linalg.norm(alone, axis=1, keepdims=True)
    assert np.sum(alone * got[:12], axis=1).min() >= 0.9999
    assert fed.encode([], 64).shape == (0, 384)


@pytest.mark.slow
def test_the_gpu_feed_is_not_used_when_it_disagrees_or_is_switched_off(st_fp32, monkeypatch, caplog):
    from embray.models import gpu
    from embray.models.tokens import Tokens

    monkeypatch.delenv("EMBRAY_GPU_FEED", raising=False)
    assert gpu.build(st_fp32, "minilm") is None  # opt-in until it is timed on a GPU
    monkeypatch.setenv("EMBRAY_GPU_FEED", "0")
    assert gpu.build(st_fp32, "minilm") is None
    monkeypatch.setenv("EMBRAY_GPU_FEED", "1")
    with monkeypatch.context() as mp, caplog.at_level("WARNING", logger="embray"):
        mp.setattr(Tokens, "pool", lambda self, hidden, mask: hidden[:, -1].float())  # the wrong token's state
        assert gpu.build(st_fp32, "minilm") is None
    assert "its vectors differ from sentence-transformers'" in caplog.text
    with monkeypatch.context() as mp, caplog.at_level("WARNING", logger="embray"):
        mp.setattr(Tokens, "encodings", lambda self, texts: self.tokenizer.encode_batch([t[::-1] for t in texts]))
        assert gpu.build(st_fp32, "minilm") is None
    assert "its tokens differ from sentence-transformers'" in caplog.text


@pytest.mark.slow
def test_a_model_off_the_cpu_is_fed_by_the_tokenizing_thread(monkeypatch):
    # What a GPU replica runs, here on the CPU: the backend takes the fed path wherever the model is not on the CPU.
    import embray.models.sentence_transformers as st

    monkeypatch.setattr(st, "_on_cpu", lambda spec: False)
    assert load_embedder(ModelSpec(device="cpu")).fed is None  # opt-in (EMBRAY_GPU_FEED=1) until timed on a GPU
    monkeypatch.setenv("EMBRAY_GPU_FEED", "1")
    e = load_embedder(ModelSpec(device="cpu"))
    assert e.fused is None and e.fed is not None
    plain = _st_plain(ModelSpec(device="cpu"), monkeypatch)
    assert np.sum(e.embed_documents(TEXTS) * plain.embed_documents(TEXTS), axis=1).min() >= 0.9999
