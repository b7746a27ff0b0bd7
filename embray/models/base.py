"""The embedder interface: one batch method; documents and queries are built on it."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from embray.errors import ModelError
from embray.models.spec import ModelSpec


@dataclass(frozen=True)
class Compute:
    """How an embedder runs its model on this machine: the path, the dtype it computes in, and why. A build
    records it (MLflow param ``embed.compute``, ``embed_compute`` in ``--json``, its log); it is never part of the
    fingerprint, since every path computes the same vector space (each is checked against the model's own)."""

    path: str  # cpu-graph | cpu-encode | cuda-feed | cuda-encode | onnxruntime | vllm | hash
    dtype: str  # fp32 | bf16 | fp16 | int8
    why: str = ""

    def __str__(self) -> str:
        return f"{self.path} {self.dtype}" + (f" ({self.why})" if self.why else "")


class Embedder(abc.ABC):
    """Turns texts into L2-normalised float32 vectors. Subclasses implement :attr:`dims` and :meth:`embed_batch`,
    and set :attr:`compute`."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.compute = Compute(spec.backend, "fp32")
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
