"""The HTTP API's request and response bodies (the OpenAPI schema at /docs is made from these)."""

# No `from __future__ import annotations`: FastAPI and pydantic must see the real types.
from pydantic import BaseModel, Field, model_validator

MAX_K = 1000


class SearchRequest(BaseModel):
    """Search by ``text`` (embedded with the serving version's model), or by a ``vector`` made with ``fingerprint``."""

    text: str | None = Field(None, description="Query text.")
    vector: list[float] | None = Field(None, description="Query vector; needs `fingerprint`.")
    fingerprint: str | None = Field(None, description="Fingerprint of the model that made `vector`.")
    k: int = Field(10, ge=1, le=MAX_K, description="Results to return.")

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        if (self.text is None) == (self.vector is None):
            raise ValueError("give exactly one of `text` or `vector`")
        if self.vector is not None and not self.fingerprint:
            raise ValueError("a `vector` query must name the `fingerprint` of the model that made it")
        if self.text is not None and not self.text.strip():
            raise ValueError("`text` is empty")
        return self


class HitModel(BaseModel):
    id: str | int
    score: float


class SearchResponse(BaseModel):
    version: str = Field(description="The version the results came from.")
    fingerprint: str = Field(description="Its vector space.")
    results: list[HitModel] = Field(description="Best first.")
    took_ms: float


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
