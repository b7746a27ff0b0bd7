"""Pure functions on rows: content hashes, shard assignment, rejects, top-k merging.

No I/O here, so every rule about which row goes where is easy to test alone. The scalar functions define
each rule; the ``*_column`` ones apply it to a whole Arrow column at once (what the build runs on millions of
rows) and must give exactly the same answer, row by row.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Sequence
from typing import Any

NULL_ID = "null id"
NULL_TEXT = "null text"
EMPTY_TEXT = "empty text"
NOT_TEXT = "text is not a string"
DUPLICATE_ID = "duplicate id"
NO_TOKENS = "no text the model reads"  # a chunked document whose text tokenises to nothing


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


def _utf8_slices(arr) -> tuple[memoryview, list[int]]:
    """A string (or integer: as its decimal string) Arrow array's UTF-8 data and value offsets, so a row's
    bytes are ``data[off[i]:off[i + 1]]`` without a Python string per row (a null row's slice is empty)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_integer(arr.type) or pa.types.is_null(arr.type):
        arr = pc.cast(arr, pa.string())
    wide = pa.types.is_large_string(arr.type)
    off = np.frombuffer(arr.buffers()[1], dtype=np.int64 if wide else np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    return memoryview(data if data is not None else b""), off.tolist()


def content_hash_column(texts, valid=None) -> list[str | None]:
    """:func:`content_hash` of each row of an Arrow string column; None where ``valid`` (a list of bools) is False."""
    if len(texts) == 0:
        return []
    data, off = _utf8_slices(texts)
    sha = hashlib.sha256
    if valid is None:
        return [sha(data[a:b]).hexdigest() for a, b in zip(off[:-1], off[1:], strict=True)]
    return [sha(data[a:b]).hexdigest() if v else None for a, b, v in zip(off[:-1], off[1:], valid, strict=True)]


def shard_column(ids, shards: int):
    """:func:`shard_of` of each row of an Arrow id column (strings or integers) as int32; a null id: shard 0."""
    import numpy as np
    import pyarrow.compute as pc

    if len(ids) == 0:
        return np.zeros(0, np.int32)
    data, off = _utf8_slices(ids)
    b2 = hashlib.blake2b
    digests = b"".join([b2(data[a:b], digest_size=8).digest() for a, b in zip(off[:-1], off[1:], strict=True)])
    out = (np.frombuffer(digests, dtype="<u8") % shards).astype(np.int32)
    out[pc.is_null(ids).to_numpy(zero_copy_only=False)] = 0
    return out


# Every character str.isspace() calls whitespace (what str.strip() removes); a test checks it against Python's.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + ("\u2028\u2029\u202f\u205f\u3000")
)
_BLANK = "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in WHITESPACE) + "]*$"  # empty or only whitespace, for RE2


def reject_column(ids, texts):
    """:func:`reject_reason` of each row of Arrow id and text columns, as a string array (null: embeddable)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        blank = pa.nulls(len(texts), pa.bool_())
        other = pc.is_valid(texts)  # a non-null value of another type: not text
    else:
        blank, other = pc.match_substring_regex(texts, _BLANK), pa.scalar(False)
    reason = pc.if_else(other, pa.scalar(NOT_TEXT), pa.scalar(None, pa.string()))
    reason = pc.if_else(pc.fill_null(blank, False), pa.scalar(EMPTY_TEXT), reason)
    reason = pc.if_else(pc.is_null(texts), pa.scalar(NULL_TEXT), reason)
    return pc.if_else(pc.is_null(ids), pa.scalar(NULL_ID), reason)


def digest_pairs(ids: Sequence[Any], hashes: Sequence[str]) -> str:
    """sha256 over (id, content_hash) pairs in order: equal digests mean equal content."""
    h = hashlib.sha256()
    for i, c in zip(ids, hashes, strict=True):
        h.update(f"{i}\t{c}\n".encode())
    return h.hexdigest()


def digest_column(ids, hashes) -> str:
    """:func:`digest_pairs` of Arrow id (strings or integers) and content-hash columns, hashed as one buffer."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(ids) == 0:
        return hashlib.sha256().hexdigest()
    if pa.types.is_integer(ids.type):
        ids = pc.cast(ids, pa.string())
    lines = pc.binary_join_element_wise(pc.binary_join_element_wise(ids, hashes, "\t"), "", "\n")
    data, off = _utf8_slices(pc.cast(lines, pa.large_string()))
    return hashlib.sha256(data[off[0] : off[-1]]).hexdigest()


def merge_topk(per_shard: Iterable[Iterable[tuple[float, Any]]], k: int) -> list[tuple[float, Any]]:
    """The k smallest distances across shards; each input is (distance, id) pairs. Equal distances are
    ordered by id, so the answer does not depend on the order the shards (or shard groups) came in."""
    return heapq.nsmallest(k, (pair for shard in per_shard for pair in shard), key=lambda p: (p[0], str(p[1])))
