"""Cutting a long document into passages that each fit the model's window (issue 27: long documents).

A passage is a slice of the document, ``text[start:end]`` exactly, that tokenises (with the model's special
tokens) to at most ``tokens``. The cut, measured against alternatives in docs/notes/issue27-chunkers.md:

1. The document is tokenised once with the model's own fast tokenizer, keeping character offsets.
2. The token range is split at paragraph breaks, then, where a piece is still over the budget, at line
   breaks, sentence ends, other whitespace, and last at fixed token windows. Pieces within the budget are
   leaves.
3. Consecutive leaves are packed into cores of at most ``tokens - specials - overlap`` tokens. A core also
   ends after an *anchor* leaf, one whose last :attr:`PassageCutter.tail_chars` characters hash below a
   threshold (about one anchor every ``target`` tokens). The anchors depend on the text alone, never on
   positions, so after an edit the cores fall back onto the old boundaries at the next anchor: editing one
   paragraph changes a couple of passages, not every later one.
4. Each passage is its core plus, from the second on, up to ``overlap`` tokens of the previous core, from a
   word boundary (``core_start`` says where the passage's own text begins).

Deterministic: the same text and settings give the same passages in any process (blake2b, no seeds).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from embray.config import ChunkConfig, Config
from embray.errors import ConfigError
from embray.lifecycle.versions import BuildKind, ChunkMeta, Manifest
from embray.models.spec import ModelSpec, resolve_model_path

log = logging.getLogger("embray")
_SENTENCE_END = frozenset(".!?")
PARAGRAPH, LINE, SENTENCE, SPACE = 4, 3, 2, 1  # the kinds of boundary before a token, strongest first


@dataclass(frozen=True)
class Passage:
    ordinal: int  # 0, 1, ... within its document
    start: int  # character span in the document: the passage is text[start:end]
    end: int
    core_start: int  # where the passage's own text begins (before it: the overlap with the previous one)
    tokens: int  # content tokens (the model adds its special tokens)


@dataclass(frozen=True)
class PassageCutter:
    """Cut texts into passages of at most ``tokens`` (special tokens included) for a tokenizer
    (``tokenizers.Tokenizer`` with padding and truncation off, e.g. :func:`fast_tokenizer`)."""

    tokenizer: object
    tokens: int = 256
    overlap: int = 32
    specials: int = 2  # tokens the model adds to every input ([CLS] and [SEP])
    target: int = 444  # about one content-defined boundary every this many tokens
    tail_chars: int = 48  # an anchor is decided by a leaf's last this many characters

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(
                f"passages of {self.tokens} tokens leave no room for text after {self.specials} special tokens "
                f"and an overlap of {self.overlap}: raise tokens or lower overlap"
            )

    @property
    def budget(self) -> int:
        """Content tokens of a passage's core."""
        return self.tokens - self.specials - self.overlap

    def cut(self, text: str) -> list[Passage]:
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        if not offsets:
            return []
        starts, ends = [s for s, _ in offsets], [e for _, e in offsets]
        kinds = _boundaries(text, starts, ends)
        cores = self._cores(text, starts, ends, kinds)
        out = []
        for k, (a, b) in enumerate(cores):
            p = a
            if self.overlap and k:
                # The earliest word boundary within `overlap` tokens before the core, inside the previous core.
                p = next((i for i in range(max(cores[k - 1][0] + 1, a - self.overlap), a) if kinds[i]), a)
            out.append(Passage(k, starts[p], ends[b - 1], starts[a], b - p))
        return out

    def _cores(self, text: str, starts: list[int], ends: list[int], kinds: list[int]) -> list[tuple[int, int]]:
        n, budget = len(starts), self.budget
        cuts = {kind: [i for i in range(1, n) if kinds[i] >= kind] for kind in (PARAGRAPH, LINE, SENTENCE, SPACE)}
        leaves: list[tuple[int, int]] = []

        def split(a: int, b: int, kind: int) -> None:
            if b - a <= budget:
                leaves.append((a, b))
            elif kind < SPACE:  # no boundary left: fixed windows
                leaves.extend((i, min(i + budget, b)) for i in range(a, b, budget))
            else:
                at = cuts[kind]
                edges = [a, *at[bisect.bisect_right(at, a) : bisect.bisect_left(at, b)], b]
                for x, y in zip(edges, edges[1:], strict=False):
                    split(x, y, kind - 1)

        split(0, n, PARAGRAPH)
        cores: list[tuple[int, int]] = []
        first = last = None
        for a, b in leaves:
            if first is not None and b - first > budget:  # the next leaf would not fit
                cores.append((first, last))
                first = None
            if first is None:
                first = a
            last = b
            tail = text[max(starts[a], ends[b - 1] - self.tail_chars) : ends[b - 1]]
            if _anchor(tail, b - a, self.target):
                cores.append((first, last))
                first = None
        if first is not None:
            cores.append((first, last))
        return cores


def _boundaries(text: str, starts: list[int], ends: list[int]) -> list[int]:
    """For each token i (1 <= i < n), the kind of boundary before it (0: inside a word); [n]: the end."""
    n = len(starts)
    kinds = [0] * (n + 1)
    kinds[n] = PARAGRAPH + 1
    for i in range(1, n):
        a, b = ends[i - 1], starts[i]
        if a == b:
            continue
        newlines = text.count("\n", a, b)
        if newlines >= 2:
            kinds[i] = PARAGRAPH
        elif newlines:
            kinds[i] = LINE
        elif text[a - 1] in _SENTENCE_END:
            kinds[i] = SENTENCE
        else:
            kinds[i] = SPACE
    return kinds


def _anchor(tail: str, tokens: int, target: int) -> bool:
    """Whether a leaf of ``tokens`` tokens ending in ``tail`` closes its core: with probability about
    tokens / target, decided by the text alone."""
    h = int.from_bytes(hashlib.blake2b(tail.encode("utf-8"), digest_size=8).digest(), "big")
    return h < (1 << 64) * min(1.0, tokens / target)


def fast_tokenizer(tokenizer_json: str):
    """The model's fast tokenizer for counting: no padding, no truncation (a shipped tokenizer.json may pad
    and truncate, e.g. MiniLM's at 128, which would make every text 128 tokens long)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    tok.no_padding()
    tok.no_truncation()
    return tok


# The cut's name and version: part of a chunked version's identity (ChunkMeta.cutter). Change it whenever
# PassageCutter would cut any text differently.
CUTTER = "embray-passages-v1: paragraph > line > sentence > space leaves, blake2b-64 anchors (target 444, tail 48)"
WORDS = "embray-words-v1: one token per run of word characters"  # the 'hash' backend's tokenizer


def chunking(
    cfg: Config, kind: BuildKind, model: ModelSpec, parent: Manifest | None, like: Manifest | None = None
) -> ChunkMeta | None:
    """How a build of ``kind`` cuts documents: as ``chunk:`` of the config says; left out, as the version it
    follows does (a refresh or compaction: its parent's chunking; a migration: its parent's; a backfill: the
    active version's, ``like``), sized to the model's window where the model changed; and in a new collection,
    into passages sized to the model's window (none for a model without one: 'hash' reads every word)."""
    if kind == BuildKind.COMPACT or (kind == BuildKind.REFRESH and cfg.chunk is None):
        return parent.chunk
    if cfg.chunk == "none":
        return None
    if isinstance(cfg.chunk, ChunkConfig):
        return chunk_meta(cfg.chunk, model)
    like = parent or like
    if like is not None:
        if like.chunk is None:
            return None
        try:  # the same settings; a window smaller than their passages: passages of the window
            return chunk_meta(ChunkConfig(tokens=like.chunk.tokens, overlap=like.chunk.overlap), model)
        except ConfigError:
            return chunk_meta(ChunkConfig(overlap=like.chunk.overlap), model)
    try:
        return None if model_window(model) is None else chunk_meta(ChunkConfig(), model)
    except ConfigError as e:
        log.warning("model %s: %s; its rows are embedded one vector per row (set chunk: to cut them)", model.label, e)
        return None


def chunk_meta(chunk: ChunkConfig, spec: ModelSpec) -> ChunkMeta:
    """The chunking ``chunk`` means for ``spec``'s model: its tokens (default: the model's window; never more),
    the specials the model adds, and the identity of its tokenizer.

    Raises:
        ConfigError: passages larger than the model's window, or a model whose window is unknown.
    """
    window = model_window(spec)
    tokens = chunk.tokens or window
    if tokens is None:
        raise ConfigError(f"model {spec.label} has no token window to size passages by: set chunk.tokens")
    if window is not None and tokens > window:
        raise ConfigError(
            f"chunk.tokens is {tokens} but model {spec.label} reads at most {window} tokens: its passages would be "
            f"truncated; set chunk.tokens to {window} or less (or leave it out: the model's window)"
        )
    if chunk.overlap >= tokens // 2:
        raise ConfigError(f"chunk.overlap {chunk.overlap} must be under half of the passage's {tokens} tokens")
    tok, digest = _tokenizer(spec)
    specials = _specials(tok, spec)
    return ChunkMeta(tokens=tokens, overlap=chunk.overlap, specials=specials, cutter=CUTTER, tokenizer=digest)


@dataclass(frozen=True)
class WindowCounter:
    """Counts, for a model that embeds one vector per row, the tokens of each text its window leaves out."""

    tokenizer: object
    window: int  # tokens the model reads, special tokens and document prefix included
    specials: int

    def dropped(self, texts: list[str]) -> list[int]:
        """Per text, its tokens past the window (0: the model reads all of it). Only texts longer (in UTF-8
        bytes) than the window's room are tokenised: no tokenizer makes more tokens than bytes."""
        room = self.window - self.specials
        out = [0] * len(texts)
        long = [i for i, t in enumerate(texts) if len(t) > room and len(t.encode("utf-8")) > room]
        if long:
            encs = self.tokenizer.encode_batch([texts[i] for i in long], add_special_tokens=False)
            for i, enc in zip(long, encs, strict=True):
                out[i] = max(0, len(enc.ids) - room)
        return out


def window_counter(spec: ModelSpec) -> WindowCounter | None:
    """The :class:`WindowCounter` of ``spec``'s model; None for a model without a window ('hash') or whose window
    or tokenizer is not in its files (then nothing is counted)."""
    try:
        window = model_window(spec)
        if window is None:
            return None
        tok, _ = _tokenizer(spec)
    except ConfigError:
        return None
    specials = _specials(tok, spec)
    return WindowCounter(tok, window, specials)


def cutter(meta: ChunkMeta, spec: ModelSpec) -> PassageCutter:
    """The :class:`PassageCutter` of a chunked version, checked to count with the tokenizer it was cut with."""
    tok, digest = _tokenizer(spec)
    if digest != meta.tokenizer:
        raise ConfigError(
            f"model {spec.label}'s tokenizer here (sha256 {digest[:12]}) is not the one its passages were cut with "
            f"({meta.tokenizer[:12]}); give every node the same model files"
        )
    return PassageCutter(tok, tokens=meta.tokens, overlap=meta.overlap, specials=meta.specials)


def model_window(spec: ModelSpec) -> int | None:
    """The most tokens ``spec``'s model reads (special tokens included); None: no limit (the 'hash' backend)."""
    if spec.backend == "hash":
        return None
    root = resolve_model_path(spec)
    found = None
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("config.json", "max_position_embeddings")):
        try:
            found = json.loads((root / name).read_text()).get(key)
        except (OSError, ValueError):
            continue
        if found:
            break
    if spec.max_tokens:
        return min(spec.max_tokens, found or spec.max_tokens)
    if not found:
        raise ConfigError(f"model {spec.label}: its window is not in {root}'s config files; set chunk.tokens")
    return int(found)


def _specials(tok, spec: ModelSpec) -> int:
    """Tokens the model adds to every document besides its text: special tokens and the document prefix."""
    return len(tok.encode(spec.document_prefix + "a").ids) - len(tok.encode("a", add_special_tokens=False).ids)


def _tokenizer(spec: ModelSpec):
    """(the model's tokenizer for counting, its identity): ``tokenizer.json`` and its sha256; for the 'hash'
    backend, which reads words, a word tokenizer."""
    if spec.backend == "hash":
        return _words(), hashlib.sha256(WORDS.encode()).hexdigest()
    path = resolve_model_path(spec) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"model {spec.label} has no {path.name} in {path.parent}: it cannot be chunked; set chunk: none"
        )
    return _load(str(path))


@functools.lru_cache(maxsize=4)
def _load(path: str):
    return fast_tokenizer(path), hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def _words():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return tok
