"""Who may ask: the query key (``serve.api_key`` / ``EMBRAY_API_KEY``) and the admin token for reloads
(``serve.admin_token`` / ``EMBRAY_ADMIN_TOKEN``), read from requests by FastAPI's security helpers (so the
OpenAPI document lists both schemes) and compared in constant time."""

# No `from __future__ import annotations`: FastAPI inspects the signatures of the route parameters.
import hmac
import os

from fastapi import HTTPException, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from embray.config import ServeConfig

# auto_error=False: a missing credential is ours to judge (no key configured means no key needed).
API_KEY = Security(APIKeyHeader(name="X-API-Key", auto_error=False, description="The query key (serve.api_key)."))
BEARER = Security(
    HTTPBearer(auto_error=False, description="The query key, or for reload the admin token (serve.admin_token).")
)


def secret(configured: str | None, env: str) -> str | None:
    return configured or os.environ.get(env) or None


def _same(got: str | None, want: str) -> bool:
    return got is not None and hmac.compare_digest(got.encode(), want.encode())


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials.strip() if credentials is not None else None


def check_query(s: ServeConfig, bearer: HTTPAuthorizationCredentials | None, api_key: str | None) -> None:
    """401 unless the query key is configured nowhere, or sent as X-API-Key (or as a bearer token)."""
    want = secret(s.api_key, "EMBRAY_API_KEY")
    if want is not None and not _same(api_key or _token(bearer), want):
        raise HTTPException(401, "an API key is required: send it as the X-API-Key header")


def check_admin(s: ServeConfig, bearer: HTTPAuthorizationCredentials | None) -> None:
    """403 while no admin token is configured (reload disabled); 401 unless the request bears it."""
    want = secret(s.admin_token, "EMBRAY_ADMIN_TOKEN")
    if want is None:
        raise HTTPException(403, "reload is disabled: set serve.admin_token or EMBRAY_ADMIN_TOKEN on the server")
    if not _same(_token(bearer), want):
        raise HTTPException(401, "reload needs `Authorization: Bearer <admin token>`")
