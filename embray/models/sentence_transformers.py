"""The 'sentence-transformers' backend (CPU or GPU), from local weights."""

from __future__ import annotations

import numpy as np

from embray.errors import ModelError
from embray.models.base import Embedder
from embray.models.spec import ModelSpec, resolve_model_path


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
