"""Pure functions on rows: content hashes, shard assignment, rejects, top-k merging.

No I/O here, so every rule about which row goes where is easy to test alone.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

NULL_ID = "null id"
NULL_TEXT = "null text"
EMPTY_TEXT = "empty text"
NOT_TEXT = "text is not a string"
DUPLICATE_ID = "duplicate id"


def content_hash(text: str) -> str:
    """sha256 of the UTF-8 text: what decides whether a row changed."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shard_of(row_id: Any, shards: int) -> int:
    """Stable hash partition of an id, the same on every process and machine (not Python's salted hash)."""
    h = hashlib.blake2b(str(row_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") % shards


def reject_reason(row_id: Any, text: Any) -> str | None:
    """Why a row cannot be embedded, or None when it can."""
    if row_id is None:
        return NULL_ID
    if text is None:
        return NULL_TEXT
    if not isinstance(text, str):
        return NOT_TEXT
    if not text.strip():
        return EMPTY_TEXT
    return None


def duplicate_ids(ids: Iterable[Any]) -> dict[Any, int]:
    """Ids that occur more than once, with how often."""
    return {i: n for i, n in Counter(i for i in ids if i is not None).items() if n > 1}


def digest_pairs(ids: Sequence[Any], hashes: Sequence[str]) -> str:
    """sha256 over (id, content_hash) pairs in order: equal digests mean equal content."""
    h = hashlib.sha256()
    for i, c in zip(ids, hashes, strict=True):
        h.update(f"{i}\t{c}\n".encode())
    return h.hexdigest()


def merge_topk(per_shard: Iterable[Iterable[tuple[float, Any]]], k: int) -> list[tuple[float, Any]]:
    """The k smallest distances across shards; each input is (distance, id) pairs. Equal distances are
    ordered by id, so the answer does not depend on the order the shards (or shard groups) came in."""
    return heapq.nsmallest(k, (pair for shard in per_shard for pair in shard), key=lambda p: (p[0], str(p[1])))
