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
import hashlib
from dataclasses import dataclass

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
