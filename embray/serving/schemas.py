"""The HTTP API's request and response bodies (the OpenAPI schema at /docs is made from these)."""

# No `from __future__ import annotations`: FastAPI and pydantic must see the real types.
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from embray.keywords import HYBRID_WEIGHTS

MAX_K = 1000
NON_NULL = ("text", "vector", "fingerprint", "queries", "filter", "fields", "weights")  # absent when unused, not null
FILTER_DOC = (
    "Only rows whose metadata (the version's `source.columns`) matches, in the MongoDB / Chroma style: "
    '`{"tenant": "acme", "published": {"$gte": "2026-01-01"}, "lang": {"$in": ["en", "de"]}}`. Operators: '
    "`$eq $ne $in $nin $gt $gte $lt $lte $exists $contains $and $or $not`; a bare value means `$eq`; several "
    "keys mean all of them. An unknown column, operator or an ill-typed value: 422 naming it."
)


def _no_nulls(data: Any) -> Any:
    if isinstance(data, dict):
        null = [k for k in NON_NULL if k in data and data[k] is None]
        if null:
            raise ValueError(f"`{null[0]}` is null: leave it out instead")
    return data


def _one_query(q: Any, what: str = "") -> None:
    if (q.text is None) == (q.vector is None):
        raise ValueError(f"give exactly one of `text` or `vector`{what}")
    if q.vector is not None and not q.fingerprint:
        raise ValueError(f"a `vector` query must name the `fingerprint` of the model that made it{what}")
    if q.text is not None and not q.text.strip():
        raise ValueError(f"`text` is empty{what}")


_ONE_QUERY = [
    {"required": ["text"], "not": {"required": ["vector"]}},
    {"required": ["vector", "fingerprint"], "not": {"required": ["text"]}},
]


class Query(BaseModel):
    """One query of a batch: a ``text``, or a ``vector`` with the ``fingerprint`` of the model that made it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": _ONE_QUERY})

    text: str | SkipJsonSchema[None] = Field(None, description="Query text.")
    vector: list[float] | SkipJsonSchema[None] = Field(None, description="Query vector; needs `fingerprint`.")
    fingerprint: str | SkipJsonSchema[None] = Field(None, description="Fingerprint of the model that made `vector`.")

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return _no_nulls(data)

    @model_validator(mode="after")
    def _one(self) -> "Query":
        _one_query(self)
        return self


class Weights(BaseModel):
    """Hybrid search: how much each side's rank counts in the fusion."""

    model_config = ConfigDict(extra="forbid")
    vector: float = Field(HYBRID_WEIGHTS[0], ge=0, allow_inf_nan=False, description="Weight of the vector ranks.")
    keyword: float = Field(HYBRID_WEIGHTS[1], ge=0, allow_inf_nan=False, description="Weight of the keyword ranks.")


class SearchRequest(BaseModel):
    """Search by ``text`` (embedded with the serving version's model), by a ``vector`` made with ``fingerprint``,
    or by a batch of such ``queries`` (answered in one round trip, their texts embedded in one batch).

    Exactly one of the three; unknown fields are refused (422), so a typo such as ``top_k`` is not ignored.
    ``text``, ``vector``, ``fingerprint`` and ``queries`` are left out when unused: an explicit ``null`` is
    refused (422), as the schema says (their types do not include null). ``k``, ``version``, ``chunks`` and
    ``partial`` apply to every query of a batch.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {**_ONE_QUERY[0], "not": {"anyOf": [{"required": ["vector"]}, {"required": ["queries"]}]}},
                {**_ONE_QUERY[1], "not": {"anyOf": [{"required": ["text"]}, {"required": ["queries"]}]}},
                {"required": ["queries"], "not": {"anyOf": [{"required": ["text"]}, {"required": ["vector"]}]}},
            ]
        },
    )

    text: str | SkipJsonSchema[None] = Field(None, description="Query text.")
    vector: list[float] | SkipJsonSchema[None] = Field(None, description="Query vector; needs `fingerprint`.")
    fingerprint: str | SkipJsonSchema[None] = Field(None, description="Fingerprint of the model that made `vector`.")
    queries: Annotated[list[Query], Field(min_length=1)] | SkipJsonSchema[None] = Field(
        None,
        description="A batch of queries, answered in order as `results: [[hits of the first], ...]` (at most "
        "`serve.max_batch`; more: 413).",
    )
    k: int = Field(10, ge=1, le=MAX_K, description="Results to return.")
    version: str | None = Field(
        None,
        description="Answer from this committed version (an id, or an alias such as `candidate`) instead of the "
        "active one: loaded on demand, kept while among the replica's `serve.max_loaded_versions`.",
        min_length=1,
    )
    chunks: bool = Field(
        False,
        description="In a version of chunked documents: answer the top `k` passages themselves (several may be of "
        "one document) instead of the top `k` documents, each scored by its best passage. Ignored otherwise.",
    )
    filter: dict[str, Any] | SkipJsonSchema[None] = Field(None, description=FILTER_DOC + " Applies to every query.")
    mode: Literal["vector", "keyword", "hybrid"] = Field(
        "vector",
        description="`vector`: nearest vectors. `keyword`: BM25 over the version's keyword index. `hybrid`: both, "
        "fused by reciprocal rank (a hit's `score` is then its fused score). Keyword and hybrid need text queries "
        "and a version built with `index.keywords` (else 422).",
    )
    weights: Weights | SkipJsonSchema[None] = Field(None, description="Hybrid only: the weight of each side.")
    fields: list[str] | SkipJsonSchema[None] = Field(
        None,
        description="Stored columns each hit carries in `fields` (`text` too where the version keeps texts: "
        "`source.store_text`); an unknown one: 422.",
    )
    partial: bool = Field(
        False,
        description="With shard groups (serve.shard_groups > 1): accept an answer from the groups that replied "
        "when one fails or times out; the response then has `partial: true` and `missing_shards`. Without it, "
        "such a request gets 503 naming the group.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        return _no_nulls(data)

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        if self.queries is not None:
            if self.text is not None or self.vector is not None or self.fingerprint is not None:
                raise ValueError("give either `queries` or one query (`text`, or `vector` and `fingerprint`)")
            return self
        _one_query(self, " (or `queries`)")
        return self


class ChunkModel(BaseModel):
    ordinal: int = Field(description="The passage's position in its document (0, 1, ...).")
    start: int = Field(description="Where the passage starts in the document's text (characters).")
    end: int = Field(description="Where it ends: the passage is the document's text[start:end].")


class HitModel(BaseModel):
    id: str | int = Field(description="The row's id; in a version of chunked documents, the document's.")
    score: float = Field(
        description="Similarity (vector mode), BM25 score (keyword) or reciprocal-rank-fused score (hybrid); "
        "higher is better."
    )
    chunk: ChunkModel | None = Field(
        None, description="In a version of chunked documents: the passage that scored (absent otherwise)."
    )
    fields: dict[str, Any] | None = Field(
        None,
        description="The stored columns the request named in `fields`, by name (timestamps and dates as ISO 8601); "
        "absent when it named none.",
    )


class SearchResponse(BaseModel):
    version: str = Field(description="The version the results came from.")
    fingerprint: str = Field(description="Its vector space.")
    results: list[HitModel] | list[list[HitModel]] = Field(
        description="Best first; for a batch (`queries`), one such list per query, in the order asked."
    )
    took_ms: float
    partial: bool | None = Field(
        None, description='Only on a "partial" request that some shard group failed: true (absent otherwise).'
    )
    missing_shards: list[int] | None = Field(
        None, description="With `partial`: the shards whose rows the results could not include."
    )


class CollectionInfo(BaseModel):
    collection: str
    version: str | None
    fingerprint: str | None
    model: str | None
    rows: int | None
    dims: int | None
    loaded_at: str | None
    load_seconds: float | None
    last_check: str | None
    last_error: str | None
    pinned: list[str] = Field(
        default_factory=list, description="Other versions loaded for pinned queries, least recently used first."
    )
    shard_groups: int = Field(1, description="Shard groups the version is spread over (serve.shard_groups).")


class ErrorBody(BaseModel):
    """Every error answer: ``detail`` says what was wrong and how to fix it (a list of field errors for a
    request body that fails validation)."""

    detail: str | list[dict[str, Any]]


class NotReady(BaseModel):
    ready: bool = False
    reason: str
    mlflow: dict[str, Any] = Field(
        default_factory=dict, description="ok, and while MLflow is unreachable since and error (also when ready)"
    )


def errors(*codes: int) -> dict[int, dict[str, Any]]:
    """OpenAPI ``responses`` for the error codes a route can answer with."""
    what = {
        401: "the API key (X-API-Key) or the admin token (Authorization: Bearer) is missing or wrong",
        403: "reload is disabled on this server (no serve.admin_token / EMBRAY_ADMIN_TOKEN)",
        404: "no such collection on this server",
        409: "the vector's fingerprint is not the serving version's: embed with that version's model, or send text",
        413: "the text is longer than serve.max_text_chars",
        422: "the request is malformed: not exactly one of text / vector, a vector without its fingerprint, an "
        "unknown field, k outside 1..1000, wrong vector dimensions, NaN / infinite values, or a filter or "
        "`fields` the version cannot answer (an unknown column or operator, an ill-typed value: named)",
        500: "an unexpected error (the server's log has it)",
        503: "no version is loaded yet, a shard group failed or timed out (named; send partial to accept the rest), "
        "or Serve is overloaded (max_queued_requests)",
    }
    return {c: {"model": ErrorBody, "description": what[c]} for c in codes}
