"""The 'onnx' backend: a sentence-transformers model exported to ONNX (optionally int8), run by onnxruntime."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from embray.errors import ModelError
from embray.models.base import Compute, Embedder
from embray.models.spec import ONNX_OPSET, ONNX_RECIPE, ModelSpec, resolve_model_path, weights_digest
from embray.storage.layout import local_cache_root


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
    recipe = hashlib.sha256(ONNX_RECIPE.encode()).hexdigest()[:12]
    return local_cache_root() / "onnx" / f"{weights_digest(spec)[:32]}-{recipe}"


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
                opset_version=ONNX_OPSET,
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
        dtype = "fp32" if spec.quantize == "none" else "int8"
        self.compute = Compute("onnxruntime", dtype, f"{self.path.name}, one text per pass")
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
