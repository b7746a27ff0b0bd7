"""The 'sentence-transformers' backend (CPU or GPU), from local weights."""

from __future__ import annotations

import logging
import os

import numpy as np

from embray.errors import ModelError
from embray.models import cpu_graph, gpu
from embray.models.base import Compute, Embedder
from embray.models.spec import ModelSpec, resolve_model_path

log = logging.getLogger("embray")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16), where a bf16 model runs 2-3x faster than
    fp32; elsewhere torch emulates bf16 and it is slower than fp32 (~5x on one AVX2 core, docs/notes/issue30).
    An instruction-set cap counts like a CPU without it: ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) below
    AVX512_CORE_BF16, or ``ATEN_CPU_CAPABILITY`` below avx512 (the cpuinfo probes below ignore both)."""
    import torch

    if bf16_capped() is not None:
        return False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return False


def bf16_capped() -> str | None:
    """The setting that keeps torch from computing bf16 natively on this CPU, or None."""
    import torch

    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        isa = os.environ.get(var, "").strip().upper()
        if isa and isa not in ("ALL", "DEFAULT") and not any(k in isa for k in ("BF16", "AMX", "FP16", "AVX10")):
            return f"{var}={isa}"
    aten = torch.backends.cpu.get_cpu_capability()
    if aten in ("DEFAULT", "NO AVX", "AVX2"):  # x86 tiers below AVX512 (ARM and POWER report others)
        return f"ATen CPU capability {aten}"
    return None


def cpu_isa() -> str:
    """What this CPU computes natively, as torch sees it under any cap: its ATen tier (AVX512, AVX2, ...; ARM
    and POWER name their own) and, on AVX512, +BF16 / +AMX / +VNNI where native; then the caps in force."""
    import platform

    import torch

    tier = torch.backends.cpu.get_cpu_capability()
    extras = []
    if tier == "AVX512":
        probes = [("VNNI", "_is_vnni_supported")]
        if bf16_capped() is None:
            probes = [("AMX", "_is_amx_tile_supported"), ("BF16", "_is_avx512_bf16_supported"), *probes]
        extras = [name for name, probe in probes if getattr(torch.cpu, probe, lambda: False)()]
    caps = [
        f"{v}={os.environ[v]}"
        for v in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
        if os.environ.get(v)
    ]
    arch = "" if platform.machine() in ("x86_64", "AMD64") else f"{platform.machine()} "
    return f"{arch}{' +'.join([tier, *extras])}" + (f", capped by {' '.join(caps)}" if caps else "")


def _dtype_why(precision: str | None, dtype) -> str:
    """Why a CPU model computes in ``dtype`` for ``precision`` (see :func:`_compute_dtype`)."""
    import torch

    isa = cpu_isa()
    if dtype is torch.bfloat16:
        return f"bf16 native on this CPU: {isa}"
    if precision == "bf16":
        return f"bf16 not native on this CPU ({isa}): fp32 computes the same space"
    return f"model.precision {precision or 'fp32'}; CPU {isa}"


def _compute_dtype(precision: str | None, device_type: str):
    """The torch dtype a sentence-transformers model computes in for ``precision`` on ``device_type``.

    CUDA: fp16 or bf16 as asked. CPU: bf16 where the CPU computes it natively (:func:`cpu_has_bf16`). Anything
    else runs in fp32, with a warning: a spec's ``precision`` travels with its versions to Serve replicas and
    audits on other machines, and those run the same space in fp32 instead of refusing it.
    """
    import torch

    if precision in (None, "fp32"):
        return torch.float32
    if device_type == "cuda":
        return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if device_type == "cpu" and precision == "bf16":
        if cpu_has_bf16():
            return torch.bfloat16
        cap = bf16_capped()
        log.warning(
            "model.precision bf16 needs a CPU with AMX or AVX512-BF16%s; running in fp32 on this one",
            f" and no instruction-set cap ({cap})" if cap else "",
        )
        return torch.float32
    log.warning("model.precision %s applies on CUDA (bf16: also on CPU); running in fp32 on %s", precision, device_type)
    return torch.float32


def _dtype_name(dtype) -> str:
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(dtype), str(dtype))


def _on_cpu(spec: ModelSpec) -> bool:
    """Whether ``spec`` runs on the CPU (device cpu, or none given and no CUDA device)."""
    if spec.device is not None:
        return spec.device == "cpu"
    import torch

    return not torch.cuda.is_available()


class SentenceTransformerEmbedder(Embedder):
    """sentence-transformers on CPU or GPU, from local weights, computing in ``spec.precision`` where it can."""

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.model = None  # the SentenceTransformer; not loaded where a cached CPU graph runs the model
        self.fused = None  # embray.models.cpu_graph.FusedEncoder on a CPU, where it applies
        self.fed = None  # embray.models.gpu.FedEncoder on a GPU, where it applies
        on_cpu = _on_cpu(spec)
        if on_cpu:
            self.dtype = _compute_dtype(spec.precision, "cpu")
            self.fused = cpu_graph.load_cached(spec, self.dtype)
            if self.fused is not None:
                self._dims = self.fused.layout.dims
                self._check_dims()
                self.compute = self._cpu_compute("graph from the local cache")
                return
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ModelError("the sentence-transformers backend needs: pip install sentence-transformers") from e
        path = resolve_model_path(spec)
        try:
            self.model = SentenceTransformer(str(path), device=spec.device, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - wrap whatever the loader raises at the boundary
            raise ModelError(f"cannot load sentence-transformers model from {path}: {e}") from e
        # transformers >= 5 loads a checkpoint in the dtype it is stored in (fp16 files: fp16, even on a CPU):
        # the compute dtype is set here instead, so that it is the spec's and not the file's.
        if not on_cpu:  # on a CPU: decided (and warned about) above
            self.dtype = _compute_dtype(spec.precision, self.model.device.type)
        if next(self.model.parameters()).dtype != self.dtype:
            self.model.to(self.dtype)
        if spec.max_tokens:
            self.model.max_seq_length = spec.max_tokens
        self._dims = int(self.model.get_embedding_dimension())
        self._check_dims()
        if on_cpu:
            self.fused, why_not = cpu_graph.build(spec, self.model, self.dtype)
            if self.fused is not None:
                self.model = None  # the frozen graph holds the weights: sentence-transformers' copy goes
                import gc

                gc.collect()
            self.compute = self._cpu_compute(why_not or "graph traced and checked now, saved in the local cache")
        else:
            self.fed = gpu.build(self.model, spec.label)
            import torch

            name = torch.cuda.get_device_name(self.model.device) if self.model.device.type == "cuda" else "?"
            why = "a tokenizing thread feeds it" if self.fed else "sentence-transformers' encode"
            path = f"{self.model.device.type}-{'feed' if self.fed else 'encode'}"
            self.compute = Compute(path, _dtype_name(self.dtype), f"{name}; {why}")

    def _cpu_compute(self, how: str) -> Compute:
        path = "cpu-graph" if self.fused is not None else "cpu-encode"
        return Compute(path, _dtype_name(self.dtype), f"{_dtype_why(self.spec.precision, self.dtype)}; {how}")

    @property
    def dims(self) -> int:
        return self._dims

    def embed_batch(self, texts: list[str]) -> np.ndarray:
        if self.fused is not None:
            return self.fused.encode(texts, self.spec.batch_size)
        if self.fed is not None:
            return self.fed.encode(texts, self.spec.batch_size)
        assert self.model is not None
        if self.model.device.type != "cuda":
            return self.model.encode(
                texts,
                batch_size=self.spec.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )
        # On a GPU the vectors stay on the device until the last batch: with convert_to_numpy, encode copies
        # each batch to the host, which waits for the GPU, so tokenising the next batch cannot overlap it.
        vecs = self.model.encode(
            texts,
            batch_size=self.spec.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )
        return vecs.float().cpu().numpy()
