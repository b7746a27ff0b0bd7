"""Metadata columns: the source columns a version keeps beside its vectors (``source.columns``), for search
filters and hit fields, and each row's text where ``source.store_text`` asks for it.

A version stores them in its embeddings parts, one value per row (a chunked version's passages carry their
document's values), under the name ``meta.<column>`` (so a source column may share a name with the part's
own columns), with a ``meta_hash`` per row: a digest of its values. A refresh compares it as it compares
the content hash, so a row whose metadata changed gets a new row (a delta segment, a tombstone for the old
one) whose vector is taken from its parent by content hash: nothing is embedded again.

Every column is stored in one of a few kinds, whatever width the source wrote it in (:data:`KINDS`).
"""

from __future__ import annotations

from typing import Any

from embray.errors import ConfigError, SourceError

PREFIX = "meta."  # a metadata column's name in row states, plans and embeddings parts
META_HASH = "meta_hash"
TEXT = "text"  # the stored text's column in an embeddings part (source.store_text)
# What a version keeps each kind of column as.
KINDS = ("string", "int64", "float64", "bool", "timestamp", "date", "list<string>")
# Names a metadata column cannot take: the columns `Collection.dataset()` gives every row.
RESERVED = ("key", "content_hash", "vector", "doc", "ordinal", "start", "end", TEXT, META_HASH)


def kept(name: str) -> bool:
    """Whether a plan's or part's column is metadata the version keeps (a column, the text, or their hash)."""
    return name.startswith(PREFIX) or name in (META_HASH, TEXT)


def check_names(columns: list[str], id_column: str, text_column: str) -> None:
    """ConfigError unless ``columns`` (``source.columns``) are distinct, not the id or text column, not a
    reserved name."""
    seen: set[str] = set()
    for c in columns:
        if not c or c.startswith("$"):
            raise ConfigError(f"source.columns: {c!r} is not a column name (empty, or starting with '$')")
        if c in seen:
            raise ConfigError(f"source.columns names {c!r} twice; list each column once")
        if c == id_column:
            raise ConfigError(f"source.columns: {c!r} is the id column, which every hit has already; remove it")
        if c == text_column:
            raise ConfigError(f"source.columns: {c!r} is the text column; set source.store_text: true to keep it")
        if c in RESERVED:
            raise ConfigError(
                f"source.columns: {c!r} is a name embray's rows use ({', '.join(RESERVED)}); "
                "rename the column in the source"
            )
        seen.add(c)


def arrow_type(kind: str):
    """The Arrow type a version stores a column of ``kind`` as."""
    import pyarrow as pa

    return {
        "string": pa.string(),
        "int64": pa.int64(),
        "float64": pa.float64(),
        "bool": pa.bool_(),
        "timestamp": pa.timestamp("us", tz="UTC"),
        "date": pa.date32(),
        "list<string>": pa.list_(pa.string()),
    }[kind]


def schema(columns: dict[str, str]):
    """The Arrow schema of a version's metadata columns (name -> kind), under their own names."""
    import pyarrow as pa

    return pa.schema([(name, arrow_type(kind)) for name, kind in columns.items()])


def kind_of(t) -> str | None:
    """The kind a column of Arrow type ``t`` is kept as; None for a type no kind holds (the types a filter can
    read: :func:`embray.filters.column_kind`, in the version's widths)."""
    import pyarrow as pa

    from embray.filters import column_kind

    if pa.types.is_dictionary(t):
        t = t.value_type
    kind = column_kind(t)
    if kind == "time":
        return "date" if pa.types.is_date(t) else "timestamp"
    return {"string": "string", "int": "int64", "float": "float64", "bool": "bool", "list": "list<string>"}.get(kind)


def kinds_of_file(schema_, columns: list[str], url: str) -> dict[str, str | None]:
    """Each of ``columns``' kind in one source file's schema (None: a column of nulls only); SourceError for a
    missing column or a type no kind holds."""
    import pyarrow as pa

    out: dict[str, str | None] = {}
    for c in columns:
        if c not in schema_.names:
            raise SourceError(
                f"{url} has no column {c!r} (source.columns); its columns are {schema_.names}: "
                "add the column to the file or remove it from source.columns"
            )
        t = schema_.field(c).type
        kind = kind_of(t)
        if kind is None and not pa.types.is_null(t):
            raise SourceError(
                f"{url}: column {c!r} (source.columns) has type {t}; metadata columns may be strings, integers, "
                f"floats, booleans, timestamps, dates or lists of strings: convert it or remove it from source.columns"
            )
        out[c] = kind
    return out


def merge_kinds(found: list[dict[str, str | None]], columns: list[str], uri: str) -> dict[str, str]:
    """One kind per column over every file (a column of nulls only takes the others' kind; one with nulls
    everywhere is a string column); SourceError where two files disagree."""
    out: dict[str, str] = {}
    for c in columns:
        kinds = {f[c] for f in found if f.get(c) is not None}
        if len(kinds) > 1:
            if kinds == {"int64", "float64"}:
                kinds = {"float64"}
            else:
                raise SourceError(
                    f"source {uri}: column {c!r} (source.columns) is {' in some files and '.join(sorted(kinds))} in "
                    "others; write it with one type in every file"
                )
        out[c] = kinds.pop() if kinds else "string"
    return out


def normalised(arr, kind: str, column: str, url: str):
    """A source column's values as a version keeps them (:func:`arrow_type` of ``kind``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    target = arrow_type(kind)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_timestamp(arr.type) and arr.type.tz is None:
        arr = arr.cast(pa.timestamp(arr.type.unit, tz="UTC"))
    try:
        if pa.types.is_timestamp(arr.type):
            return arr.cast(target, safe=False)  # nanoseconds are truncated to microseconds
        return pc.cast(arr, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise SourceError(f"{url}: column {column!r} cannot be kept as {kind} ({e}); convert it in the source") from e


def meta_hash_column(table, columns: list[str], store_text: bool) -> Any:
    """Per row of ``table`` (holding ``meta.<c>`` for each of ``columns``), a digest of its metadata values
    and of what the version keeps (the column names and kinds, and whether texts are stored): two rows with
    equal digests need no new row in a refresh."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from embray.storage.rows import content_hash_column

    n, columns = table.num_rows, sorted(columns)
    if n == 0:
        return pa.array([], pa.string())
    head = "\x1f".join([*(f"{c}:{table.column(PREFIX + c).type}" for c in columns), f"text:{store_text}"])
    parts = [pa.array([head] * n, pa.string())]
    for c in columns:
        col = table.column(PREFIX + c)
        if pa.types.is_list(col.type):
            col = pc.binary_join(col, "\x1e")
        parts.append(pc.fill_null(pc.cast(col, pa.string()), "\x00"))  # (a null differs from every value)
    joined = pc.binary_join_element_wise(*parts, "\x1d")
    return pa.array(content_hash_column(joined), pa.string())
