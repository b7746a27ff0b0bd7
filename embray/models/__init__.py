"""Model specs, fingerprints and the embedders behind them.

- :mod:`embray.models.spec`: :class:`ModelSpec` and :func:`fingerprint` (the identity of a vector space)
- :mod:`embray.models.base`: :class:`Embedder`, one batch method that documents and queries go through
- one module per backend: ``hash``, ``sentence_transformers``, ``onnx``, ``vllm`` (imported on first use)
"""

from __future__ import annotations

import importlib

from embray.models.base import Embedder
from embray.models.spec import MINILM, ModelSpec, fingerprint, resolve_model_path, weights_digest

# backend -> (module, class); a backend's heavy dependencies load only when a model of it does
_BACKENDS = {
    "hash": ("embray.models.hash", "HashEmbedder"),
    "sentence-transformers": ("embray.models.sentence_transformers", "SentenceTransformerEmbedder"),
    "vllm": ("embray.models.vllm", "VllmEmbedder"),
    "onnx": ("embray.models.onnx", "OnnxEmbedder"),
}


def load_embedder(spec: ModelSpec) -> Embedder:
    """Load the model behind ``spec`` (heavy: call it inside the actor or replica that embeds).

    Args:
        spec: The model spec, e.g. ``Collection.open(...).config.model`` or a version's ``manifest.model``.

    Returns:
        An :class:`Embedder`; ``embed_documents`` / ``embed_queries`` give L2-normalised float32 vectors.

    Raises:
        ModelError: The backend is not installed, the weights cannot be found or loaded.
    """
    module, name = _BACKENDS[spec.backend]
    return getattr(importlib.import_module(module), name)(spec)


__all__ = ["MINILM", "Embedder", "ModelSpec", "fingerprint", "load_embedder", "resolve_model_path", "weights_digest"]
