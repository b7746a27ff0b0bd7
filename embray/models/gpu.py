"""The GPU path of the 'sentence-transformers' backend: the model fed by a tokenizing thread.

On a GPU, MiniLM's forward pass is not what limits a backfill: measured on an H200, it runs at ~9M tokens/s in
fp16 while ``SentenceTransformer.encode`` tokenises ~0.8M tokens/s (transformers' tokenizer wrapper turns every
batch into Python lists, pads them and makes tensors, in the one thread that also drives the GPU), so the card
idles ~90% of the time (docs/benchmarks.md). Here the texts go through :class:`embray.models.tokens.Tokens`
instead: the `tokenizers` library straight (long texts from a prefix), in a background thread that tokenises the
next piece of the call while the GPU computes this one; batches of texts sorted by token count, padded to a
multiple of 8 tokens; pooling in fp32 on the GPU; one copy to the host at the end.

The transformer is sentence-transformers' own module, in the dtype the spec asks (``model.precision``), so the
vectors are the model's; before it is used, its token ids and vectors are checked against ``encode`` on probe
texts (ids equal, cosine >= 0.9999), or ``encode`` keeps running the model. Nothing here is CUDA-specific: the
tests run the same code on a CPU.

**Opt-in for now** (``EMBRAY_GPU_FEED=1`` in the environment of the processes that embed): it has not been timed
on a GPU yet (the session that built it was refused a device), so ``encode`` stays the default there. On 2 CPUs
its tokenising alone runs 1.3x (synthetic ~1,400-character documents) to 3.9x (man pages) transformers'
wrapper. ``bench/gpu_feed.py`` is the check to run on a lent device before it becomes the default.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from embray.models.tokens import PROBE, Layout, Tokens, batches, read_layout

log = logging.getLogger("embray")

PAD_TOKENS = 8  # batch widths are a multiple of this (tensor-core friendly shapes)
PIECE_TEXTS = 4096  # texts tokenised at a time: the next piece is tokenised while the GPU computes this one
OPTIN = "EMBRAY_GPU_FEED"  # "1": use the feed on a GPU (opt-in until measured on one; see above)


class FedEncoder:
    """A sentence-transformers model's transformer fed by :class:`Tokens`; see the module's notes."""

    def __init__(self, model, layout: Layout, piece: int = PIECE_TEXTS):
        self.transformer = model[0].auto_model
        self.device = model.device
        self.layout = layout
        self.tokens = Tokens(layout)
        self.piece = piece
        self._feeder = ThreadPoolExecutor(1, thread_name_prefix="embray-tokenize")

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """float32 vectors (not normalised) in ``texts``' order, in batches of up to ``batch_size`` texts of
        similar token counts."""
        import torch

        out = torch.empty((len(texts), self.layout.dims), dtype=torch.float32, device=self.device)
        starts = range(0, len(texts), self.piece)
        pending = self._feeder.submit(self.tokens.encodings, texts[: self.piece]) if texts else None
        for start in starts:
            encs = pending.result()
            if start + self.piece < len(texts):  # tokenised while the GPU computes this piece
                pending = self._feeder.submit(self.tokens.encodings, texts[start + self.piece : start + 2 * self.piece])
            lengths = np.array([len(e.ids) for e in encs])
            for idx, _ in batches(lengths, lambda width: batch_size, PAD_TOKENS):
                out[torch.from_numpy(idx + start).to(self.device)] = self.forward([encs[i] for i in idx])
        return out.cpu().numpy()

    def forward(self, encs: list):
        """fp32 pooled vectors of one batch of encodings, on the model's device."""
        import torch

        ids, mask, types = (
            None if t is None else t.to(self.device, non_blocking=True) for t in self.tokens.tensors(encs, PAD_TOKENS)
        )
        feats = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            feats["token_type_ids"] = types
        with torch.inference_mode():
            return self.tokens.pool(self.transformer(**feats).last_hidden_state, mask)


def enabled() -> bool:
    return os.environ.get(OPTIN, "0").strip().lower() in ("1", "true", "yes", "on")


def build(model, label: str) -> FedEncoder | None:
    """The fed encoder of ``model`` (a loaded SentenceTransformer, on its device and in its dtype), checked against
    its own ``encode``; None where the path is not switched on, does not apply, or the check fails."""
    if not enabled():
        return None
    layout = read_layout(model)
    if layout is None:
        return None
    try:
        enc = FedEncoder(model, layout)
        _check(enc, model)
    except Exception as e:  # noqa: BLE001 - whatever fails, sentence-transformers' encode still runs the model
        log.warning("the tokenizing feed is not used for %s (%s); sentence-transformers' encode runs it", label, e)
        return None
    return enc


def _check(enc: FedEncoder, model) -> None:
    """Raise unless the encoder's token ids are sentence-transformers' and its vectors agree with ``encode``, alone
    and in a batch of other lengths."""
    if not enc.tokens.same_ids_as(model):
        raise ValueError("its tokens differ from sentence-transformers'")
    want = model.encode(PROBE, convert_to_tensor=True, normalize_embeddings=False).float().cpu().numpy()
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    for got in (np.concatenate([enc.encode([t], 1) for t in PROBE]), enc.encode(PROBE * 3, 64)[: len(PROBE)]):
        got = got / np.linalg.norm(got, axis=1, keepdims=True)
        cos = float(np.sum(got * want, axis=1).min())
        if cos < 0.9999:
            raise ValueError(f"its vectors differ from sentence-transformers' (cosine {cos:.6f})")


__all__ = ["PAD_TOKENS", "PIECE_TEXTS", "FedEncoder", "build"]
