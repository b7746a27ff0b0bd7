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

The vectors stay the model's: tokens come from the model's own fast tokenizer (``tokenizer.json``), truncated
to sentence-transformers' ``max_seq_length``; pooling (mean or CLS, the model's) is done in fp32. When the graph
is made, its token ids and vectors are checked against sentence-transformers' ``encode`` on probe texts
(ids equal, cosine >= 0.9999), or it is not used. A text's vector does not depend on its batch (cosine
>= 0.9999 alone vs in any batch; tests/test_models.py). Two things keep the graph from compiling again and
again: batches are padded to a multiple of :data:`PAD_TOKENS` tokens (masked, so the vectors do not change),
and batches of fewer than :data:`MIN_BATCH` texts (a query, a few texts) run the same graph unoptimised.

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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from embray.layout import local_cache_root
from embray.models.spec import ModelSpec, resolve_model_path, weights_digest

log = logging.getLogger("embray")

RECIPE = "torchscript trace, eager attention, frozen, oneDNN fusion; fast tokenizer, prefix cut; fp32 pooling; v2"
PAD_TOKENS = 32  # batches are padded to a multiple of this many tokens: few shapes for the graph to compile
CUT_CHARS = 8  # long texts are tokenised from a prefix of this many characters per token of the limit (below)
BATCH_TOKENS = 8192  # at most this many tokens a batch (MiniLM, 1 core: 32 x 256 ran 12% faster than 64 x 256)
MIN_BATCH = 8  # smaller batches run the graph unoptimised: a query never waits for a new shape to compile
PROBE = [
    "a",
    "  Leading and trailing spaces, UPPER case, accents: café, naïve; digits 12345 and symbols #@!  ",
    "a longer probe text that needs more tokens than the others, " * 60,  # past any model's token limit
]
OPTOUT = "EMBRAY_CPU_GRAPH"


@dataclass(frozen=True)
class GraphMeta:
    """How texts become the graph's inputs and its output a vector (saved beside the graph)."""

    pooling: str  # "mean" or "cls"
    max_tokens: int  # truncation, special tokens included
    lower: bool  # sentence-transformers' do_lower_case
    pad_id: int
    types: bool  # whether the graph takes token type ids
    dims: int
    tokenizer: str  # the tokenizer.json it was checked with
    cut: int = 0  # texts longer than this many characters are tokenised from a prefix first (0: never)


class FusedEncoder:
    """Encodes texts with the traced transformer; see the module's notes."""

    def __init__(self, graph, meta: GraphMeta):
        from tokenizers import Tokenizer

        self.graph = graph
        self.meta = meta
        self.tokenizer = Tokenizer.from_file(meta.tokenizer)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(meta.max_tokens)
        self.calls = {"graph": 0, "plain": 0}  # forward passes by path: tests read these

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """float32 vectors (not normalised), longest first, in batches of up to ``batch_size`` texts and
        :data:`BATCH_TOKENS` tokens (padding included)."""
        out = np.empty((len(texts), self.meta.dims), dtype=np.float32)
        encs = self.encodings(texts)
        order = np.argsort([-len(e.ids) for e in encs], kind="stable")
        start = 0
        while start < len(texts):
            width = _round_up(len(encs[order[start]].ids), PAD_TOKENS)
            rows = max(1, min(batch_size, BATCH_TOKENS // width))
            idx = order[start : start + rows]
            # Only full batches of at least MIN_BATCH texts run fused: one shape per width to compile
            out[idx] = self.forward([encs[i] for i in idx], fuse=len(idx) == rows >= MIN_BATCH)
            start += len(idx)
        return out

    def tokens(self, encs: list, multiple: int = 1):
        """(input ids, attention mask, token type ids or None) of a batch of encodings, padded to its longest
        rounded up to ``multiple``."""
        import torch

        width = _round_up(max(len(e.ids) for e in encs), multiple)
        ids = torch.full((len(encs), width), self.meta.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        types = torch.zeros((len(encs), width), dtype=torch.long) if self.meta.types else None
        for row, e in enumerate(encs):
            n = len(e.ids)
            ids[row, :n] = torch.tensor(e.ids)
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = torch.tensor(e.type_ids)
        return ids, mask, types

    def forward(self, encs: list, fuse: bool) -> np.ndarray:
        """Pooled vectors of one batch of encodings: through the fused graph, or the same graph unoptimised."""
        import torch

        ids, mask, types = self.tokens(encs, PAD_TOKENS if fuse else 1)
        args = (ids, mask) if types is None else (ids, mask, types)
        with torch.no_grad(), torch.jit.optimized_execution(fuse):
            hidden = self.graph(*args).float()
        self.calls["graph" if fuse else "plain"] += 1
        if self.meta.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return pooled.numpy()

    def encodings(self, texts: list[str]) -> list:
        """The texts' encodings, truncated to the token limit.

        A long text is tokenised from its first :attr:`GraphMeta.cut` characters, cut before a space or a line
        break: the tokenizer splits words there, so those tokens are the whole text's first ones, and the rest
        (a man page runs to 300,000 characters; MiniLM keeps the first ~1,300) is never read: 5x less
        tokenising on man pages. Where the prefix does not reach the limit, the whole text is tokenised.
        """
        cut = [_prefix(t, self.meta.cut) for t in texts] if self.meta.cut else texts
        encs = self.tokenizer.encode_batch([t.lower() for t in cut] if self.meta.lower else cut)
        for i, (text, short, enc) in enumerate(zip(texts, cut, encs, strict=True)):
            if short is not text and not enc.overflowing:
                encs[i] = self.tokenizer.encode(text.lower() if self.meta.lower else text)
        return encs


def _prefix(text: str, chars: int) -> str:
    """``text`` up to its last space or line break within the first ``chars`` characters (``text`` itself when
    it is no longer, or has no such break in its second half)."""
    if len(text) <= chars:
        return text
    end = max(text.rfind(" ", 0, chars + 1), text.rfind("\n", 0, chars + 1))
    return text[:end] if end > chars // 2 else text


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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
        meta = GraphMeta(**json.loads((where / "meta.json").read_text()))
        torch.jit.enable_onednn_fusion(True)
        return FusedEncoder(torch.jit.load(str(where / "graph.pt")), meta)
    except Exception as e:  # noqa: BLE001 - a damaged (or partly deleted) cache entry is made again
        log.warning("ignoring the cached CPU graph in %s (%s); making it again", where, e)
        shutil.rmtree(where, ignore_errors=True)
        return None


def build(spec: ModelSpec, model, dtype) -> FusedEncoder | None:
    """Trace ``model`` (a loaded SentenceTransformer on the CPU, in ``dtype``), check it against the model's own
    ``encode`` and save it for :func:`load_cached`. None where the path does not apply or the check fails."""
    if not enabled():
        return None
    meta = _meta(model)
    if meta is None:
        return None
    try:
        enc = FusedEncoder(_trace(model[0].auto_model, meta.types), meta)
        _check(enc, model)
    except Exception as e:  # noqa: BLE001 - whatever fails, sentence-transformers' encode still runs the model
        log.warning("the fused CPU graph is not used for %s (%s); sentence-transformers' encode runs it", spec.label, e)
        return None
    _save(enc, cache_dir(spec, dtype))
    enc.calls = {"graph": 0, "plain": 0}
    return enc


def _meta(model) -> GraphMeta | None:
    """How the model tokenises and pools, for a Transformer -> Pooling (mean | cls) -> (Normalize) model with a
    fast tokenizer and no default prompt; None for anything else."""
    kinds = [type(m).__name__ for m in model]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    if getattr(model, "default_prompt_name", None) or not hasattr(model[0], "auto_model"):
        return None
    pool = model[1]
    mode = getattr(pool, "pooling_mode", None)  # sentence-transformers >= 6; older: one flag per mode
    if mode is None:
        on = [k for k, v in vars(pool).items() if k.startswith("pooling_mode_") and v]
        mode = (
            {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}.get(on[0]) if len(on) == 1 else None
        )
    tokenizer_json = Path(model[0].tokenizer.name_or_path) / "tokenizer.json"
    if mode not in ("mean", "cls") or not tokenizer_json.is_file():
        return None
    types = "token_type_ids" in _st_tokens(model, ["probe"])
    max_tokens = int(model.max_seq_length)
    return GraphMeta(
        pooling=mode,
        max_tokens=max_tokens,
        lower=bool(getattr(model[0], "do_lower_case", False)),
        pad_id=int(model[0].tokenizer.pad_token_id or 0),
        types=types,
        dims=int(model.get_embedding_dimension()),
        tokenizer=str(tokenizer_json.resolve()),
        cut=CUT_CHARS * max_tokens if _splits_at_spaces(tokenizer_json) else 0,
    )


# Normalizers that map characters one by one, and pre-tokenizers that end a word at every space and line break:
# with these, a text's tokens up to a space are the tokens of its prefix up to that space.
_LOCAL_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Strip"}
_SPLITTING_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}


def _splits_at_spaces(tokenizer_json: Path) -> bool:
    """Whether a prefix cut before a space tokenises to the whole text's first tokens (:func:`_prefix`)."""
    try:
        doc = json.loads(tokenizer_json.read_text())
    except (OSError, ValueError):
        return False

    def kinds(part) -> list[str]:
        if not part:
            return []
        inner = part.get("normalizers") or part.get("pretokenizers")
        return [k for p in inner for k in kinds(p)] if part.get("type") == "Sequence" else [part.get("type")]

    norms, pres = kinds(doc.get("normalizer")), kinds(doc.get("pre_tokenizer"))
    further = _SPLITTING_PRE_TOKENIZERS | {"Digits", "Punctuation"}  # after a split at spaces: split words more
    return (
        set(norms) <= _LOCAL_NORMALIZERS
        and bool(pres)
        and pres[0] in _SPLITTING_PRE_TOKENIZERS
        and set(pres) <= further
    )


def _st_tokens(model, texts: list[str]) -> dict:
    """The features sentence-transformers' encode feeds its model (``tokenize`` before version 6)."""
    return (getattr(model, "preprocess", None) or model.tokenize)(texts)


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
    feats = _st_tokens(model, PROBE)
    ids, mask, _ = enc.tokens(enc.encodings(PROBE))
    if not (ids.shape == feats["input_ids"].shape and bool((ids == feats["input_ids"]).all())):
        raise ValueError("its tokens differ from sentence-transformers'")
    want = model.encode(PROBE, convert_to_tensor=True, normalize_embeddings=False).float().numpy()
    want /= np.linalg.norm(want, axis=1, keepdims=True)  # in fp32, as embray does (bf16 normalising loses ~1e-3)
    alone = [enc.forward(enc.encodings([t]), fuse=False)[0] for t in PROBE]
    batch = enc.encodings((PROBE * MIN_BATCH)[:MIN_BATCH])
    for got in [np.stack(alone)] + [enc.forward(batch, fuse=True)[: len(PROBE)] for _ in range(3)]:
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
        (tmp / "meta.json").write_text(json.dumps(asdict(enc.meta), indent=1))
        os.replace(tmp, where)
    except OSError as e:  # another process saved it first, or the cache is not writable: use it unsaved
        log.debug("CPU graph not saved in %s: %s", where, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["MIN_BATCH", "PAD_TOKENS", "FusedEncoder", "GraphMeta", "build", "load_cached"]
