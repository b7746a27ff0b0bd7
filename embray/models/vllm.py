"""The 'vllm' backend: vLLM's pooling runner on GPU nodes (CUDA only)."""

from __future__ import annotations

import numpy as np

from embray.errors import ModelError
from embray.models.base import Compute, Embedder
from embray.models.spec import ModelSpec, resolve_model_path


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
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        self.compute = Compute("vllm", str(getattr(config, "dtype", "auto")).replace("torch.", ""), "pooling runner")
        self._check_dims()

    @property
    def dims(self) -> int:
        return self._dims

    def embed_batch(self, texts: list[str]) -> np.ndarray:
        outputs = self.llm.embed(texts, use_tqdm=False)
        return np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32)
