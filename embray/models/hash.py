"""The 'hash' backend: deterministic feature hashing, for pipeline tests and benchmarks."""

from __future__ import annotations

import hashlib
import re
import time

import numpy as np

from embray.models.base import Embedder

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
