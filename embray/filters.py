"""Metadata filters for search: a JSON object in the MongoDB / Chroma / Pinecone style, checked against a version's
metadata columns and evaluated over an Arrow table as a boolean mask.

    from embray.filters import parse_filter
    f = parse_filter({"tenant": "acme", "published": {"$gte": "2026-01-01"}, "lang": {"$in": ["en", "de"]}}, schema)
    keep = f.mask(table)        # numpy bool array, one per row

Grammar
-------
A filter is a JSON object. Each key is either a column name, whose value is a condition on that column, or one of
the logical operators ``$and``, ``$or``, ``$not``. Several keys in one object must all hold (AND).

- ``{"col": value}`` is ``{"col": {"$eq": value}}``.
- ``{"col": {"$op": value, ...}}``: one or more operators, all of which must hold (AND). Operators:
  ``$eq $ne $gt $gte $lt $lte`` (one value), ``$in $nin`` (a list of at most 1,024 values; an empty list is allowed),
  ``$exists`` (``true`` or ``false``), ``$contains`` (one string), ``$not`` (an object of operators, e.g.
  ``{"price": {"$not": {"$gt": 3}}}``).
- ``{"$and": [filter, ...]}`` and ``{"$or": [filter, ...]}``: a non-empty list of filter objects.
- ``{"$not": filter}``: a filter object.

A filter may be given as a dict or as JSON text (as the CLI passes it); ``None``, ``{}`` and blank text mean no
filter. At most 256 conditions (one per operator on a column) and at most 16 levels of ``$and``/``$or``/``$not``
(counted on the canonical form, ``Filter.to_json()``, where directly nested ``$and`` are merged, as are ``$or``,
and an object of several conditions is one ``$and`` level). Anything else (an unknown column or operator, an
operator at the wrong level, a value of the wrong type) is a :class:`~embray.errors.QueryError` whose message
names the offending piece by its path, e.g. ``filter.$or[1].price``, and the fix.

Semantics
---------
- **Nulls.** A comparison against a null value is false: ``$eq $gt $gte $lt $lte $in $contains`` never match a
  null. ``$ne`` and ``$nin`` are the exact negations of ``$eq`` and ``$in``, so they do match nulls (as in MongoDB).
  ``$exists: true`` matches the non-null values, ``$exists: false`` the nulls. ``$not`` negates exactly, at the
  top level (``{"$not": {...}}``) and on a column (``{"price": {"$not": {"$gt": 3}}}`` matches rows whose price is
  at most 3 *or null*).
- **Numbers** (integer and floating-point columns). The value is a JSON number; booleans are not numbers, and
  NaN and infinities are refused. Integer values on float columns and float values on integer columns compare by
  their numeric value (``{"count": {"$gt": 2.5}}`` is ``count >= 3``; ``{"count": 2.5}`` matches nothing; values
  beyond the column type's range are handled exactly). A float column is compared in float64; a float NaN stored
  in a column matches only ``$ne``, ``$nin``, ``$not`` and ``$exists: true``.
- **Strings.** Exact, case-sensitive comparison; ``$gt``/``$gte``/``$lt``/``$lte`` compare lexicographically by
  Unicode code point; ``$contains`` is substring (the empty string is in every string).
- **Timestamps and dates.** The value is an ISO 8601 string: ``"2026-01-01"``, ``"2026-01-01T12:00"``,
  ``"2026-01-01T12:00:00.250"``, with an optional ``Z`` or ``+02:00`` offset (a space may replace the ``T``; up to
  9 fractional digits). A value without an offset is UTC, and so are the values of a column without a time zone.
  Comparisons are exact between instants: a date column's value is its midnight UTC (``{"day": {"$gte":
  "2026-01-01T12:00"}}`` excludes 2026-01-01), and a value finer than the column's unit is not rounded
  (``{"ts": {"$gte": "2026-01-01T00:00:00.5Z"}}`` on a seconds column excludes ``00:00:00``). A malformed or
  impossible date (``"2026-02-30"``) is a QueryError naming it.
- **Booleans.** ``$eq $ne $in $nin $exists`` only; the value is ``true`` or ``false``.
- **Lists of strings** behave like MongoDB arrays: ``$eq`` (or a bare value) and ``$contains`` match a list
  holding that element; ``$ne`` matches when no element equals it (an empty or null list included); ``$in`` when
  any element is in the list, ``$nin`` when none is; ``$exists`` tests the list itself for null (an empty list
  exists). Ordering operators are refused, and so is a list as a value (use ``$in``).
- Columns of other types (binary, structs, decimals, lists of non-strings, ...) cannot be filtered on; a filter
  that names one is a QueryError naming its type. Dictionary-encoded columns are read as their value type.

The :class:`Filter` value object
--------------------------------
``parse_filter(spec, schema)`` returns a :class:`Filter` (or ``None`` for no filter): frozen, hashable, picklable,
with ``columns`` (the column names it reads), ``mask(table)`` (vectorised with ``pyarrow.compute`` on whole
columns; the table may hold more columns than ``columns``) and ``to_json()``, the canonical spec: every condition
spelt ``{"col": {"$op": value}}``, conjunctions as ``$and``, times as UTC ISO strings ending in ``Z`` (a plain
date at midnight UTC); it parses back to an equal filter.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embray.errors import QueryError

MAX_IN_VALUES = 1024
MAX_DEPTH = 16
MAX_CONDITIONS = 256
_MAX_RAW_DEPTH = 4 * MAX_DEPTH  # bounds the parser's recursion before the canonical depth can be known

COLUMN_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$contains", "$not")
LOGICAL_OPS = ("$and", "$or", "$not")
_ORDER = ("$gt", "$gte", "$lt", "$lte")
_KIND_OPS = {
    "bool": ("$eq", "$ne", "$in", "$nin", "$exists", "$not"),
    "list": ("$eq", "$ne", "$in", "$nin", "$contains", "$exists", "$not"),
}
_NAMES = "strings, integers, floats, booleans, timestamps, dates and lists of strings"
_ISO_HINT = 'write ISO 8601, e.g. "2026-01-01" or "2026-01-01T12:00:00Z"'
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NS_PER_DAY = 86_400 * 10**9
_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?(Z|[+-]\d{2}:?\d{2})?)?"
)


# ---- the tree --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cond:
    """One operator on one column. ``value`` is normalised: a tuple for ``$in``/``$nin``, nanoseconds since the
    epoch (UTC) for timestamp and date columns, else the JSON value. ``kind`` is the column's kind."""

    column: str
    op: str
    value: Any
    kind: str


@dataclass(frozen=True)
class And:
    children: tuple


@dataclass(frozen=True)
class Or:
    children: tuple


@dataclass(frozen=True)
class Not:
    child: Any


Node = Union[Cond, And, Or, Not]


def _and(children: list) -> Node:
    flat = [g for c in children for g in (c.children if isinstance(c, And) else (c,))]
    return flat[0] if len(flat) == 1 else And(tuple(flat))


def _or(children: list) -> Node:
    flat = [g for c in children for g in (c.children if isinstance(c, Or) else (c,))]
    return flat[0] if len(flat) == 1 else Or(tuple(flat))


def _not(child: Node) -> Node:
    return child.child if isinstance(child, Not) else Not(child)


def _depth(node: Node) -> int:
    if isinstance(node, Cond):
        return 0
    if isinstance(node, Not):
        return 1 + _depth(node.child)
    return 1 + max(_depth(c) for c in node.children)


def _walk(node: Node):
    if isinstance(node, Cond):
        yield node
    elif isinstance(node, Not):
        yield from _walk(node.child)
    else:
        for c in node.children:
            yield from _walk(c)


@dataclass(frozen=True)
class Filter:
    """A checked metadata filter: see the module docstring. Build it with :func:`parse_filter`."""

    root: Node

    @property
    def columns(self) -> frozenset:
        """The names of the columns the filter reads."""
        return frozenset(c.column for c in _walk(self.root))

    def mask(self, table: pa.Table) -> np.ndarray:
        """A numpy bool array with one entry per row of ``table``: True where the row matches."""
        cache: dict = {}
        return _eval(self.root, table, cache)

    def to_json(self) -> dict:
        """The canonical spec, JSON-able; ``parse_filter(f.to_json(), schema) == f``."""
        return _dump(self.root)


# ---- parsing ---------------------------------------------------------------------------------------------------


def parse_filter(spec: Any, schema: pa.Schema) -> Filter | None:
    """Check ``spec`` (a dict, JSON text, a :class:`Filter` or None) against the metadata ``schema`` and return
    the :class:`Filter`, or None where there is no filter (None, ``{}``, blank text). Raises QueryError."""
    if not isinstance(schema, pa.Schema):
        raise TypeError(f"parse_filter needs a pyarrow.Schema, got {type(schema).__name__}")
    if isinstance(spec, Filter):
        spec = spec.to_json()
    elif isinstance(spec, (str, bytes)):
        spec = _loads(spec)
    if spec is None or (isinstance(spec, dict) and not spec):
        return None
    if not isinstance(spec, dict):
        raise QueryError(f"filter: must be a JSON object mapping columns to conditions, got {_show(spec)}")
    root = _Parser(schema).filter(spec, "filter", 0)
    if _depth(root) > MAX_DEPTH:
        raise QueryError(_too_deep("filter"))
    return Filter(root)


def _loads(text: str | bytes) -> Any:
    if not text.strip():
        return None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise QueryError(
            f"filter: malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}; "
            'pass a JSON object, e.g. {"lang": "en"}'
        ) from e
    except RecursionError as e:
        raise QueryError(_too_deep("filter")) from e


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise QueryError(f"filter: duplicate key {k!r} in the JSON text; put its conditions in one object")
        out[k] = v
    return out


def _too_deep(path: str) -> str:
    return f"{path}: nested deeper than {MAX_DEPTH} levels of $and/$or/$not; flatten the filter"


def _show(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        kind = "an object" if isinstance(v, dict) else "a list"
        return f"{kind} {json.dumps(v, default=repr)[:60]}"
    return repr(v)[:60]


def _type_name(t: pa.DataType) -> str:
    return str(t).replace("item: ", "").replace("element: ", "")


def column_kind(t: pa.DataType) -> str | None:
    """The kind a filter reads a column of Arrow type ``t`` as: string, int, float, bool, time or list (of
    strings); None where a filter cannot read it."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "time"
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and column_kind(t.value_type) == "string":
        return "list"
    return None


class _Parser:
    def __init__(self, schema: pa.Schema):
        self.types = {f.name: f.type for f in schema}
        self.conditions = 0

    def filter(self, spec: Any, path: str, depth: int) -> Node:
        """A filter object: columns and logical operators, ANDed."""
        if depth > _MAX_RAW_DEPTH:
            raise QueryError(_too_deep(path))
        if not isinstance(spec, dict):
            raise QueryError(f"{path}: a filter must be a JSON object, got {_show(spec)}")
        if not spec:
            raise QueryError(f"{path}: empty filter; remove it or give it a condition")
        parts = []
        for key, value in spec.items():
            if not isinstance(key, str):
                raise QueryError(f"{path}: keys must be strings, got {key!r}")
            here = f"{path}.{key}"
            if key in LOGICAL_OPS:
                parts.append(self.logical(key, value, here, depth + 1))
            elif key.startswith("$"):
                raise QueryError(self._misplaced(key, here))
            else:
                parts.append(self.column(key, value, here, depth))
        return _and(parts)

    @staticmethod
    def _misplaced(key: str, path: str) -> str:
        if key in COLUMN_OPS:
            return f'{path}: {key} applies to a column, not to the whole filter; write {{"<column>": {{"{key}": ...}}}}'
        return f"{path}: unknown operator {key!r}; at the top of a filter use $and, $or, $not or a column name"

    def logical(self, op: str, value: Any, path: str, depth: int) -> Node:
        if op == "$not":
            if not isinstance(value, dict) or not value:
                raise QueryError(f'{path}: $not needs a filter object, e.g. {{"$not": {{"lang": "en"}}}}')
            return _not(self.filter(value, path, depth))
        if not isinstance(value, (list, tuple)) or not value:
            raise QueryError(f"{path}: {op} needs a non-empty list of filters, got {_show(value)}")
        children = [self.filter(v, f"{path}[{i}]", depth) for i, v in enumerate(value)]
        return _and(children) if op == "$and" else _or(children)

    def column(self, name: str, value: Any, path: str, depth: int) -> Node:
        """A column's condition: a bare value (``$eq``) or an object of operators."""
        t = self._type(name, path)
        if not isinstance(value, dict):
            return self.op(name, t, "$eq", value, path, depth)
        if not value:
            raise QueryError(
                f'{path}: empty condition on column {name!r}; write a value or operators, e.g. {{"$eq": ...}}'
            )
        return _and([self.op(name, t, op, v, f"{path}.{op}", depth) for op, v in value.items()])

    def _type(self, name: str, path: str) -> pa.DataType:
        if name not in self.types:
            cols = sorted(self.types)
            near = difflib.get_close_matches(name, cols, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            if not cols:
                raise QueryError(
                    f"{path}: unknown column {name!r}; this version stores no metadata columns "
                    "(set source.columns to add some)"
                )
            shown = ", ".join(cols[:30]) + (f", ... ({len(cols) - 30} more)" if len(cols) > 30 else "")
            raise QueryError(
                f"{path}: unknown column {name!r}{hint}; this version's columns are: {shown} "
                "(set source.columns to add one)"
            )
        t = self.types[name]
        if column_kind(t) is None:
            raise QueryError(
                f"{path}: column {name!r} has type {_type_name(t)}, which a filter cannot read (it reads {_NAMES})"
            )
        return t

    def op(self, name: str, t: pa.DataType, op: str, value: Any, path: str, depth: int) -> Node:
        """One operator on a column, checked against the column's kind."""
        kind = column_kind(t)
        if not isinstance(op, str):
            raise QueryError(f"{path}: keys must be strings, got {op!r}")
        if op not in COLUMN_OPS:
            if op in LOGICAL_OPS:
                raise QueryError(
                    f"{path}: {op} is not a column operator; write it at the filter's level, "
                    f'e.g. {{"{op}": [{{"{name}": ...}}, ...]}}'
                )
            raise QueryError(f"{path}: unknown operator {op!r} on column {name!r}; use one of {', '.join(COLUMN_OPS)}")
        if kind in _KIND_OPS and op not in _KIND_OPS[kind]:
            what = "a boolean" if kind == "bool" else "a list"
            raise QueryError(
                f"{path}: {op} does not apply to {what} column {name!r} ({_type_name(t)}); "
                f"use one of {', '.join(_KIND_OPS[kind])}"
            )
        if op == "$contains" and kind not in ("string", "list"):
            raise QueryError(
                f"{path}: $contains needs a string or list column; {name!r} is {_type_name(t)} (use $eq or $in)"
            )
        if op == "$not":
            return self.column_not(name, value, path, depth + 1)
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise QueryError(
                f"{path}: more than {MAX_CONDITIONS} conditions in the filter; use $in for many values of one column"
            )
        return Cond(name, op, self.value(name, t, op, value, path), kind)

    def column_not(self, name: str, value: Any, path: str, depth: int) -> Node:
        if depth > _MAX_RAW_DEPTH:
            raise QueryError(_too_deep(path))
        if not isinstance(value, dict) or not value:
            raise QueryError(f'{path}: $not needs an object of operators, e.g. {{"$not": {{"$gt": 3}}}}')
        return _not(self.column(name, value, path, depth))

    def value(self, name: str, t: pa.DataType, op: str, value: Any, path: str) -> Any:
        if op == "$exists":
            if not isinstance(value, bool):
                raise QueryError(f"{path}: $exists needs true or false, got {_show(value)}")
            return value
        if op in ("$in", "$nin"):
            if not isinstance(value, (list, tuple)):
                raise QueryError(f'{path}: {op} needs a list, got {_show(value)} (e.g. {{"{op}": ["en", "de"]}})')
            if len(value) > MAX_IN_VALUES:
                raise QueryError(
                    f"{path}: {op} has {len(value)} values; at most {MAX_IN_VALUES} are allowed "
                    "(split it into several conditions under $or)"
                )
            return tuple(_scalar(name, t, op, v, f"{path}[{i}]") for i, v in enumerate(value))
        return _scalar(name, t, op, value, path)


def _scalar(name: str, t: pa.DataType, op: str, v: Any, path: str) -> Any:
    """One value of a condition, checked against the column's kind and normalised."""
    kind = column_kind(t)
    where = f"for column {name!r} ({_type_name(t)})"
    if kind in ("int", "float"):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise QueryError(f"{path}: {op} needs a number {where}, got {_show(v)}{_null_hint(v)}")
        if isinstance(v, float) and not math.isfinite(v):
            raise QueryError(f"{path}: {op} needs a finite number {where}, got {v!r}")
        if kind == "float":
            try:
                float(v)
            except OverflowError as e:
                raise QueryError(f"{path}: {op} got a number too large for a float {where}: {v}") from e
        return v
    if kind == "bool":
        if not isinstance(v, bool):
            raise QueryError(f"{path}: {op} needs true or false {where}, got {_show(v)}{_null_hint(v)}")
        return v
    if not isinstance(v, str):
        hint = "; use $in to match any of several" if kind == "list" and isinstance(v, (list, tuple)) else ""
        hint = _null_hint(v) or hint
        need = "an ISO 8601 date string" if kind == "time" else "a string"
        raise QueryError(f"{path}: {op} needs {need} {where}, got {_show(v)}{hint}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise QueryError(f"{path}: {op} got a string that is not valid Unicode {where}: {v!r}") from e
    if kind == "time":
        try:
            return parse_instant(v)
        except ValueError as e:
            raise QueryError(f"{path}: {op} got an invalid date {v!r} {where}: {e}; {_ISO_HINT}") from e
    return v


def _null_hint(v: Any) -> str:
    return '; use {"$exists": false} to match nulls' if v is None else ""


# ---- times -----------------------------------------------------------------------------------------------------


def parse_instant(text: str) -> int:
    """Nanoseconds since 1970-01-01 UTC of an ISO 8601 date or date-time (naive = UTC). Raises ValueError."""
    m = _ISO.fullmatch(text)
    if not m:
        raise ValueError("not an ISO 8601 date")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    dt = datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0), tzinfo=timezone.utc)
    offset = 0
    if tz and tz != "Z":
        hh, mm = int(tz[1:3]), int(tz[-2:])
        if hh > 23 or mm > 59:
            raise ValueError(f"bad UTC offset {tz}")
        offset = (hh * 60 + mm) * 60 * (1 if tz[0] == "+" else -1)
    delta = dt - _EPOCH
    ns = ((delta.days * 86_400 + delta.seconds) - offset) * 10**9 + int((frac or "").ljust(9, "0"))
    format_instant(ns)  # in range of a datetime after the offset
    return ns


def format_instant(ns: int) -> str:
    """The canonical ISO 8601 text of ``ns`` nanoseconds since the epoch: a date at midnight UTC, else
    ``YYYY-MM-DDTHH:MM:SS[.fraction]Z``."""
    secs, frac = divmod(ns, 10**9)
    try:
        dt = (_EPOCH + timedelta(seconds=secs)).replace(tzinfo=None)
    except OverflowError as e:
        raise ValueError("out of range") from e
    if ns % _NS_PER_DAY == 0:
        return dt.date().isoformat()
    text = dt.isoformat(timespec="seconds")
    return text + (f".{frac:09d}".rstrip("0") if frac else "") + "Z"


def _ns_per_unit(t: pa.DataType) -> int:
    if pa.types.is_date32(t):
        return _NS_PER_DAY
    if pa.types.is_date64(t):
        return 10**6
    return {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}[t.unit]


# ---- evaluation ------------------------------------------------------------------------------------------------


def _eval(node: Node, table: pa.Table, cache: dict) -> np.ndarray:
    if isinstance(node, Cond):
        return _leaf(node, _column(node, table, cache), table.num_rows)
    if isinstance(node, Not):
        return ~_eval(node.child, table, cache)
    masks = (_eval(c, table, cache) for c in node.children)
    out = next(masks).copy()
    for m in masks:
        (np.logical_and if isinstance(node, And) else np.logical_or)(out, m, out=out)
    return out


def _column(cond: Cond, table: pa.Table, cache: dict) -> pa.ChunkedArray:
    """The column ``cond`` reads, decoded (dictionaries, string views) and checked against the parsed kind."""
    if cond.column not in cache:
        if cond.column not in table.column_names:
            raise QueryError(f"filter: the table has no column {cond.column!r} (the filter reads it)")
        col = table.column(cond.column)
        if column_kind(col.type) != cond.kind:
            raise QueryError(
                f"filter: column {cond.column!r} is {_type_name(col.type)} in the table, "
                f"not the {cond.kind} the filter was parsed for"
            )
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if pa.types.is_string_view(col.type):
            col = col.cast(pa.large_string())
        cache[cond.column] = col
    return cache[cond.column]


def _bools(result: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numpy bool array of an Arrow boolean result, null as False (its bitmaps unpacked, without a copy through
    Python objects or a fill_null pass)."""
    chunks = result.chunks if isinstance(result, pa.ChunkedArray) else [result]
    parts = [_unpack(c) for c in chunks]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def _unpack(a: pa.BooleanArray) -> np.ndarray:
    validity, data = a.buffers()[:2]
    bits = _bits(data, a.offset, len(a))
    if a.null_count:
        bits &= _bits(validity, a.offset, len(a))
    return bits


def _bits(buf: pa.Buffer, offset: int, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=bool)
    raw = np.frombuffer(buf, dtype=np.uint8, count=(offset % 8 + n + 7) // 8, offset=offset // 8)
    return np.unpackbits(raw, count=offset % 8 + n, bitorder="little")[offset % 8 :].view(bool)


def _leaf(cond: Cond, col: pa.ChunkedArray, n: int) -> np.ndarray:
    op = cond.op
    if op == "$exists":
        valid = _bools(pc.is_valid(col))
        return valid if cond.value else ~valid
    if op in ("$ne", "$nin"):
        return ~_leaf(Cond(cond.column, "$eq" if op == "$ne" else "$in", cond.value, cond.kind), col, n)
    if cond.kind == "list":
        return _list_leaf(cond, col, n)
    if op == "$contains":
        return _bools(pc.match_substring(col, cond.value))
    if cond.kind in ("int", "time"):
        return _int_leaf(cond, col, n)
    values = cond.value if op == "$in" else (cond.value,)
    if cond.kind == "float":
        col, values, t = col.cast(pa.float64()), [float(v) for v in values], pa.float64()
    else:
        t = col.type
    if op == "$in":
        return _bools(_member(col, values, t))
    return _bools(_COMPARE[op](col, pa.scalar(values[0], t)))


def _member(col: Any, values: list, t: pa.DataType) -> Any:
    """``col`` is one of ``values`` (Arrow booleans); one value is a plain (faster) equality."""
    if len(values) == 1:
        return pc.equal(col, pa.scalar(values[0], t))
    return pc.is_in(col, value_set=pa.array(values, t))


_COMPARE = {
    "$eq": pc.equal,
    "$gt": pc.greater,
    "$gte": pc.greater_equal,
    "$lt": pc.less,
    "$lte": pc.less_equal,
    ">=": pc.greater_equal,
    "<=": pc.less_equal,
}


def _int_leaf(cond: Cond, col: pa.ChunkedArray, n: int) -> np.ndarray:
    """A condition on integers (integer, timestamp and date columns), exact for any value: the value becomes an
    integer bound of the column's own type (``x > 2.5`` is ``x >= 3``), or a constant where out of its range."""
    if cond.kind == "time":
        per = _ns_per_unit(col.type)
        col = col.cast(pa.int32() if pa.types.is_date32(col.type) else pa.int64())
        exact = [Fraction(v, per) for v in (cond.value if cond.op == "$in" else (cond.value,))]
    else:
        exact = [Fraction(v) for v in (cond.value if cond.op == "$in" else (cond.value,))]
    info = np.iinfo(col.type.to_pandas_dtype())
    lo, hi = int(info.min), int(info.max)
    if cond.op == "$in":
        keep = [int(x) for x in exact if x.denominator == 1 and lo <= x <= hi]
        return _bools(_member(col, keep, col.type))
    bound = _bound(cond.op, exact[0], lo, hi)
    if bound is True:
        return _bools(pc.is_valid(col))
    if bound is False:
        return np.zeros(n, dtype=bool)
    return _bools(_COMPARE[bound[0]](col, pa.scalar(bound[1], col.type)))


def _bound(op: str, x: Fraction, lo: int, hi: int) -> tuple[str, int] | bool:
    """``column <op> x`` over integers in [lo, hi] as ("$eq" | ">=" | "<=", integer), or True (every non-null value)
    or False (none)."""
    if op == "$eq":
        return ("$eq", int(x)) if x.denominator == 1 and lo <= x <= hi else False
    if op in ("$gt", "$gte"):
        b = math.floor(x) + 1 if op == "$gt" else math.ceil(x)
        return True if b <= lo else False if b > hi else (">=", b)
    b = math.ceil(x) - 1 if op == "$lt" else math.floor(x)
    return True if b >= hi else False if b < lo else ("<=", b)


def _list_leaf(cond: Cond, col: pa.ChunkedArray, n: int) -> np.ndarray:
    """``$eq``/``$contains``/``$in`` on a list column: rows with at least one matching element (per chunk, over the
    chunk's slice of the element values; null lists match nothing)."""
    values = list(cond.value) if cond.op == "$in" else [cond.value]
    out = []
    for chunk in col.chunks:
        offsets = chunk.offsets.to_numpy()
        elems = chunk.values.slice(offsets[0], offsets[-1] - offsets[0])
        if pa.types.is_dictionary(elems.type) or pa.types.is_string_view(elems.type):
            elems = elems.cast(pa.large_string())
        hit_elem = _bools(_member(elems, values, elems.type))
        seen = np.concatenate([[0], np.cumsum(hit_elem, dtype=np.int64)])  # matching elements before each offset
        hit = seen[offsets[1:] - offsets[0]] > seen[offsets[:-1] - offsets[0]]
        out.append(hit & _bools(chunk.is_valid()) if chunk.null_count else hit)
    return np.concatenate(out) if out else np.zeros(n, dtype=bool)


# ---- the canonical JSON ----------------------------------------------------------------------------------------


def _dump(node: Node) -> dict:
    if isinstance(node, Cond):
        return {node.column: {node.op: _dump_value(node)}}
    if isinstance(node, Not):
        return {"$not": _dump(node.child)}
    return {"$and" if isinstance(node, And) else "$or": [_dump(c) for c in node.children]}


def _dump_value(cond: Cond) -> Any:
    one = format_instant if cond.kind == "time" and cond.op != "$exists" else (lambda v: v)
    return [one(v) for v in cond.value] if cond.op in ("$in", "$nin") else one(cond.value)
