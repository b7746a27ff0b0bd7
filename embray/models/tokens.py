"""From texts to a model's token tensors, and from its token states to vectors, the way sentence-transformers does
it for a Transformer -> Pooling (mean | cls) -> (Normalize) model, without its per-call Python overhead.

Shared by the two fast paths of the 'sentence-transformers' backend: the fused graph on a CPU
(:mod:`embray.models.cpu_graph`) and the model fed by a tokenizing thread on a GPU (:mod:`embray.models.gpu`).
Tokens come from the model's fast tokenizer (``tokenizer.json``, through the `tokenizers` library), truncated to
sentence-transformers' ``max_seq_length``, lower-cased where the model does; a long text is tokenised from a prefix
only (:meth:`Tokens.encodings`). Batches are cut from texts sorted by their token count, so few pad tokens are
computed, and pooling (the model's: mean or CLS) is done in fp32. Both paths check their ids and vectors against
sentence-transformers' own before they are used.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CUT_CHARS = 8  # long texts are tokenised from a prefix of this many characters per token of the limit
# Normalizers that map characters one by one, and pre-tokenizers that end a word at every space and line break:
# with these, a text's tokens up to a space are the tokens of its prefix up to that space.
_LOCAL_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Strip"}
_SPLITTING_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
PROBE = [
    "a",
    "  Leading and trailing spaces, UPPER case, accents: café, naïve; digits 12345 and symbols #@!  ",
    "a longer probe text that needs more tokens than the others, " * 60,  # past any model's token limit
]


@dataclass(frozen=True)
class Layout:
    """How texts become a model's inputs and its output a vector (saved beside a cached CPU graph)."""

    pooling: str  # "mean" or "cls"
    max_tokens: int  # truncation, special tokens included
    lower: bool  # sentence-transformers' do_lower_case
    pad_id: int
    types: bool  # whether the model takes token type ids
    dims: int
    tokenizer: str  # the tokenizer.json it was checked with
    cut: int = 0  # texts longer than this many characters are tokenised from a prefix first (0: never)


def read_layout(model) -> Layout | None:
    """The :class:`Layout` of a loaded SentenceTransformer that is Transformer -> Pooling (mean | cls) ->
    (Normalize) with a fast tokenizer and no default prompt; None for anything else."""
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
    max_tokens = int(model.max_seq_length)
    return Layout(
        pooling=mode,
        max_tokens=max_tokens,
        lower=bool(getattr(model[0], "do_lower_case", False)),
        pad_id=int(model[0].tokenizer.pad_token_id or 0),
        types="token_type_ids" in st_tokens(model, ["probe"]),
        dims=int(model.get_embedding_dimension()),
        tokenizer=str(tokenizer_json.resolve()),
        cut=CUT_CHARS * max_tokens if splits_at_spaces(tokenizer_json) else 0,
    )


def st_tokens(model, texts: list[str]) -> dict:
    """The features sentence-transformers' encode feeds its model (``tokenize`` before version 6)."""
    return (getattr(model, "preprocess", None) or model.tokenize)(texts)


class Tokens:
    """A model's tokenizer as :class:`Layout` describes it."""

    def __init__(self, layout: Layout):
        from tokenizers import Tokenizer

        self.layout = layout
        self.tokenizer = Tokenizer.from_file(layout.tokenizer)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(layout.max_tokens)

    def encodings(self, texts: list[str]) -> list:
        """The texts' encodings, truncated to the token limit.

        A long text is tokenised from its first :attr:`Layout.cut` characters, cut before a space or a line
        break: the tokenizer splits words there, so those tokens are the whole text's first ones, and the rest
        (a man page runs to 300,000 characters; MiniLM keeps the first ~1,300) is never read: 5x less
        tokenising on man pages. Where the prefix does not reach the limit, the whole text is tokenised.
        """
        lower = self.layout.lower
        cut = [prefix(t, self.layout.cut) for t in texts] if self.layout.cut else texts
        encs = self.tokenizer.encode_batch([t.lower() for t in cut] if lower else cut)
        for i, (text, short, enc) in enumerate(zip(texts, cut, encs, strict=True)):
            if short is not text and not enc.overflowing:
                encs[i] = self.tokenizer.encode(text.lower() if lower else text)
        return encs

    def tensors(self, encs: list, multiple: int | Callable[[int], int] = 1):
        """(input ids, attention mask, token type ids or None) of a batch of encodings, as CPU tensors padded to
        the longest rounded up to ``multiple`` (or to ``multiple(longest)``)."""
        import torch

        width = padded(max(len(e.ids) for e in encs), multiple)
        ids = np.full((len(encs), width), self.layout.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        types = np.zeros((len(encs), width), dtype=np.int64) if self.layout.types else None
        for row, e in enumerate(encs):
            n = len(e.ids)
            ids[row, :n] = e.ids
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = e.type_ids
        return torch.from_numpy(ids), torch.from_numpy(mask), None if types is None else torch.from_numpy(types)

    def pool(self, hidden, mask):
        """fp32 sentence vectors from a batch's token states (the model's pooling; padding masked out)."""
        hidden = hidden.float()
        if self.layout.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def same_ids_as(self, model) -> bool:
        """Whether these encodings give sentence-transformers' own token ids on :data:`PROBE`."""
        feats = st_tokens(model, PROBE)
        ids, _, _ = self.tensors(self.encodings(PROBE))
        return ids.shape == feats["input_ids"].shape and bool((ids == feats["input_ids"]).all())


def batches(
    lengths: np.ndarray, rows_for: Callable[[int], int], multiple: int | Callable[[int], int]
) -> Iterator[tuple[np.ndarray, int]]:
    """Batches of text positions, longest first: (positions, the rows a full batch of that width has), where a
    batch is as wide as its longest text rounded up to ``multiple`` (or ``multiple(longest)``) and
    ``rows_for(width)`` rows tall."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    start = 0
    while start < len(order):
        rows = max(1, rows_for(padded(int(lengths[order[start]]), multiple)))
        yield order[start : start + rows], rows
        start += rows


def prefix(text: str, chars: int) -> str:
    """``text`` up to its last space or line break within the first ``chars`` characters (``text`` itself when
    it is no longer, or has no such break in its second half)."""
    if len(text) <= chars:
        return text
    end = max(text.rfind(" ", 0, chars + 1), text.rfind("\n", 0, chars + 1))
    return text[:end] if end > chars // 2 else text


def splits_at_spaces(tokenizer_json: Path) -> bool:
    """Whether a prefix cut before a space tokenises to the whole text's first tokens (:func:`prefix`)."""
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
    splits = bool(pres) and pres[0] in _SPLITTING_PRE_TOKENIZERS and set(pres) <= further
    return splits and set(norms) <= _LOCAL_NORMALIZERS


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded(n: int, multiple: int | Callable[[int], int]) -> int:
    """``n`` rounded up to ``multiple``, or ``multiple(n)`` where it is a function."""
    return multiple(n) if callable(multiple) else round_up(n, multiple)


__all__ = ["PROBE", "Layout", "Tokens", "batches", "prefix", "read_layout", "splits_at_spaces", "st_tokens"]
