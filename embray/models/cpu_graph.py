"""The CPU fast path of the 'sentence-transformers' backend: the transformer as one fused, cached graph.

sentence-transformers runs a model op by op. On a CPU that leaves time on the table: measured with MiniLM in
bf16 on one core (AMD EPYC, AVX512-BF16), the matrix products run near the core's peak, but the attention
block (head size 32) runs at a quarter of it and took 26% of the time. Here the transformer is traced once
into a TorchScript graph (eager attention: plain matmul / softmax ops), frozen, and run by TorchScript with
oneDNN's graph fuser on, which fuses the attention block and the bias / GELU epilogues (~1.2x the throughput
of ``encode`` on long pages in batches of 32). The graph is saved in the local cache (keyed by the weights
digest, the compute dtype, the token limit, torch's version and this recipe), so a process that finds it
loads torch and the `tokenizers` library only: no transformers, no sentence-transformers (~3-4 s of imports
per embedding actor on a 2-CPU node).

The vectors stay the model's: tokens and pooling are :mod:`embray.models.tokens`' (the model's fast tokenizer,
its truncation and lower-casing, its pooling in fp32). When the graph
is made, its token ids and vectors are checked against sentence-transformers' ``encode`` on probe texts
(ids equal, cosine >= 0.9999), or it is not used. A text's vector does not depend on its batch (cosine
>= 0.9999 alone vs in any batch; tests/test_models.py). A compiled shape keeps its oneDNN state for the life
of the process (~0.3 GiB each in fp32), so few are compiled: batches of texts of :data:`FUSE_FROM` tokens or
more are padded (masked, so the vectors do not change) to one of :func:`fused_widths` (MiniLM: 256)
and run fused, where fusion pays (eager attention over long texts); narrower batches, and batches of fewer than
:data:`MIN_BATCH` texts (a query, a few texts), run the same graph unoptimised, padded to their longest text.

Memory: a batch is at most :data:`BATCH_TOKENS` tokens, and loading the encoder fixes glibc's mmap threshold
(:func:`bound_heap`): by default glibc raises it to the largest block freed (up to 32 MiB), so the batches'
freed activations stay in the heap and a MiniLM worker grew to 0.9 (bf16) - 1.6 GiB (fp32) RSS; see
docs/notes/issue30-cpu-tiers.md.

Only Transformer -> Pooling (mean | cls) -> (Normalize) models with a fast tokenizer and no default prompt
take this path; anything else, or ``EMBRAY_CPU_GRAPH=0`` in the environment, keeps sentence-transformers'
``encode``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from embray.models.spec import ModelSpec, resolve_model_path, weights_digest
from embray.models.tokens import PROBE, Layout, Tokens, batches, read_layout
from embray.storage.layout import local_cache_root

log = logging.getLogger("embray")

RECIPE = "torchscript trace, eager attention, frozen, oneDNN fusion; fast tokenizer, prefix cut; fp32 pooling; v2"
BATCH_TOKENS = 2048  # at most this many tokens a fused batch (MiniLM, 1 core: 8 x 256 as fast as 16 x 256)
# ... and an unoptimised (narrow) one, in fp32 (bf16: twice as many, the same bytes): its activations stay in the
# core's caches. MiniLM, one core, 1,000 docstrings of 50-300 characters, vs plain encode: AVX2-capped fp32
# 1.82x at 1,024 tokens a batch, 1.60x at 2,048; native bf16 3.22x at 1,024, 3.39x at 2,048.
NARROW_TOKENS = 1024
MMAP_THRESHOLD = 8 << 20  # glibc: blocks of this many bytes or more are mmapped, and unmapped when freed
MIN_BATCH = 8  # smaller batches run the graph unoptimised: a query never waits for a new shape to compile
# Batches whose longest text has this many tokens or more are padded to one of a few widths (fused_widths) and
# run fused; narrower ones run the same graph unoptimised, padded to their longest text. Measured on one core,
# MiniLM (docs/notes/issue30-cpu-tiers.md): fusion pays on wide batches (long pages under an AVX2 cap: 0.69x
# plain encode unoptimised, the traced graph's eager attention unfused against plain's sdpa; 1.13x fused), not
# on narrow ones (2,000 docstrings: 22.7 s unoptimised vs 23.4-27.5 s fused), and every compiled shape keeps its
# oneDNN state for the life of the process (fp32: ~0.3 GiB each). 3,000 demo docstrings, one AVX2-capped core,
# fp32: fused at 192 and 256, 1,205 MiB, 68.9 s; at 256 only (160-255 tokens padded to it), 884 MiB, 68.6 s;
# native bf16: 879 vs 735 MiB, 29.1 vs 28.9 s.
FUSE_FROM = 160
OPTOUT = "EMBRAY_CPU_GRAPH"


def fused_widths(max_tokens: int) -> list[int]:
    """The widths wide batches are padded to and compiled at: the model's window (a multiple of 8), then its
    halves while they reach FUSE_FROM, so a batch is padded to at most twice its tokens. MiniLM (256): 256."""
    out = [-(-max_tokens // 8) * 8]
    while (half := -(-out[0] // 16) * 8) >= FUSE_FROM:
        out.insert(0, half)
    return out


def bound_heap() -> None:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (process-wide; glibc only; left alone where
    ``MALLOC_MMAP_THRESHOLD_`` is set): a batch's large activations then go back to the system when freed."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return
        import ctypes

        ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (AttributeError, OSError, ValueError):  # not glibc
        return


class FusedEncoder:
    """Encodes texts with the traced transformer; see the module's notes."""

    def __init__(self, graph, layout: Layout, dtype):
        bound_heap()
        self.graph = graph
        self.layout = layout
        self.narrow_tokens = NARROW_TOKENS * 4 // dtype.itemsize  # fp32: NARROW_TOKENS; bf16: twice that
        self.tokens = Tokens(layout)
        self.calls = {"graph": 0, "plain": 0}  # forward passes by path: tests read these
        self.widths = fused_widths(layout.max_tokens)
        self.shapes: set[tuple[int, int]] = set()  # the batch shapes run fused so far (compiled, kept)

    def width(self, tokens: int) -> int:
        """The width of a batch whose longest text has ``tokens`` tokens: a fused width from FUSE_FROM tokens,
        else the text's own."""
        if tokens < FUSE_FROM:
            return tokens
        return next((w for w in self.widths if w >= tokens), tokens)

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """float32 vectors (not normalised), longest first, in batches of up to ``batch_size`` texts and
        :data:`BATCH_TOKENS` tokens (fused; :data:`NARROW_TOKENS` unoptimised), padding included."""
        out = np.empty((len(texts), self.layout.dims), dtype=np.float32)
        encs = self.tokens.encodings(texts)
        lengths = np.array([len(e.ids) for e in encs])

        def rows_for(width: int) -> int:
            return min(batch_size, (BATCH_TOKENS if width in self.widths else self.narrow_tokens) // width)

        for idx, rows in batches(lengths, rows_for, self.width):
            # Only full batches of at least MIN_BATCH texts at a fused width run fused: a few shapes to compile
            width = self.width(int(lengths[idx].max()))
            fuse = len(idx) == rows >= MIN_BATCH and width in self.widths
            if fuse:
                self.shapes.add((rows, width))
            out[idx] = self.forward([encs[i] for i in idx], width if fuse else 1)
        return out

    def forward(self, encs: list, width: int) -> np.ndarray:
        """Pooled vectors of one batch of encodings: padded to ``width`` tokens through the fused graph, or (width
        1: to its longest text) through the same graph unoptimised."""
        import torch

        fuse = width > 1
        ids, mask, types = self.tokens.tensors(encs, (lambda n: width) if fuse else 1)
        args = (ids, mask) if types is None else (ids, mask, types)
        with torch.no_grad(), torch.jit.optimized_execution(fuse):
            hidden = self.graph(*args)
        self.calls["graph" if fuse else "plain"] += 1
        return self.tokens.pool(hidden, mask).numpy()


def enabled() -> bool:
    return os.environ.get(OPTOUT, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir(spec: ModelSpec, dtype) -> Path:
    import torch

    key = json.dumps([RECIPE, str(dtype), spec.max_tokens, torch.__version__, str(resolve_model_path(spec))])
    return (
        local_cache_root()
        / "cpu-graph"
        / f"{weights_digest(spec)[:32]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    )


def load_cached(spec: ModelSpec, dtype) -> FusedEncoder | None:
    """The encoder saved by an earlier :func:`build` for this model and dtype on this machine, or None."""
    import torch

    if not enabled():
        return None
    where = cache_dir(spec, dtype)
    if not where.is_dir():
        return None
    try:
        layout = Layout(**json.loads((where / "meta.json").read_text()))
        torch.jit.enable_onednn_fusion(True)
        return FusedEncoder(torch.jit.load(str(where / "graph.pt")), layout, dtype)
    except Exception as e:  # noqa: BLE001 - a damaged (or partly deleted) cache entry is made again
        log.warning("ignoring the cached CPU graph in %s (%s); making it again", where, e)
        shutil.rmtree(where, ignore_errors=True)
        return None


def build(spec: ModelSpec, model, dtype) -> tuple[FusedEncoder | None, str]:
    """Trace ``model`` (a loaded SentenceTransformer on the CPU, in ``dtype``), check it against the model's own
    ``encode`` and save it for :func:`load_cached`: (the encoder, ""), or (None, why not) where the path does not
    apply or the check fails."""
    if not enabled():
        return None, f"{OPTOUT}=0: sentence-transformers' encode"
    layout = read_layout(model)
    if layout is None:
        return None, "not a Transformer -> Pooling model with a fast tokenizer: sentence-transformers' encode"
    try:
        enc = FusedEncoder(_trace(model[0].auto_model, layout.types), layout, dtype)
        _check(enc, model)
    except Exception as e:  # noqa: BLE001 - whatever fails, sentence-transformers' encode still runs the model
        log.warning("the fused CPU graph is not used for %s (%s); sentence-transformers' encode runs it", spec.label, e)
        return None, f"the fused graph failed its check ({e}): sentence-transformers' encode"
    _save(enc, cache_dir(spec, dtype))
    enc.calls = {"graph": 0, "plain": 0}
    return enc, ""


def _trace(transformer, types: bool):
    """The transformer (eager attention) traced on a padded example and frozen."""
    import torch

    class _Hidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            names = ("input_ids", "attention_mask", "token_type_ids")
            return self.inner(**dict(zip(names, args, strict=False))).last_hidden_state

    # The example has a padded row, so no "nothing is padded" shortcut of the model is traced in.
    ids = torch.full((2, 16), 1000, dtype=torch.long)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 9:] = 0
    example = (ids, mask, torch.zeros(2, 16, dtype=torch.long)) if types else (ids, mask)
    attn = transformer.config._attn_implementation
    torch.jit.enable_onednn_fusion(True)
    try:
        transformer.config._attn_implementation = "eager"  # sdpa is one opaque op to the fuser
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shapes taken as constants: _check checks
            traced = torch.jit.trace(_Hidden(transformer).eval(), example, check_trace=False, strict=False)
            return torch.jit.freeze(traced)
    finally:
        transformer.config._attn_implementation = attn


def _check(enc: FusedEncoder, model) -> None:
    """Raise unless the encoder's token ids are sentence-transformers' and its vectors agree with ``encode``,
    in a batch of other lengths and padding than the trace's example, unoptimised and fused (3 passes: the
    graph is profiled, then fused, then run fused)."""
    if not enc.tokens.same_ids_as(model):
        raise ValueError("its tokens differ from sentence-transformers'")
    want = model.encode(PROBE, convert_to_tensor=True, normalize_embeddings=False).float().numpy()
    want /= np.linalg.norm(want, axis=1, keepdims=True)  # in fp32, as embray does (bf16 normalising loses ~1e-3)
    alone = [enc.forward(enc.tokens.encodings([t]), 1)[0] for t in PROBE]
    batch = enc.tokens.encodings((PROBE * MIN_BATCH)[:MIN_BATCH])
    width = enc.width(max(FUSE_FROM, *(len(e.ids) for e in batch)))  # a fused width, padded past the probes
    for got in [np.stack(alone)] + [enc.forward(batch, width)[: len(PROBE)] for _ in range(3)]:
        got = got / np.linalg.norm(got, axis=1, keepdims=True)
        cos = float(np.sum(got * want, axis=1).min())
        if cos < 0.9999:
            raise ValueError(f"its vectors differ from sentence-transformers' (cosine {cos:.6f})")


def _save(enc: FusedEncoder, where: Path) -> None:
    """Write the graph and its meta into ``where`` as a whole (a directory renamed into place)."""
    import torch

    tmp = where.with_name(f".{where.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        tmp.mkdir(parents=True)
        torch.jit.save(enc.graph, str(tmp / "graph.pt"))
        (tmp / "meta.json").write_text(json.dumps(asdict(enc.layout), indent=1))
        os.replace(tmp, where)
    except OSError as e:  # another process saved it first, or the cache is not writable: use it unsaved
        log.debug("CPU graph not saved in %s: %s", where, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["FUSE_FROM", "MIN_BATCH", "FusedEncoder", "build", "fused_widths", "load_cached"]
