"""The errors embray raises.

Every error a user can meet is an :class:`EmbrayError`; the CLI prints its
message on one line and exits with its ``exit_code``. Library errors (pyarrow,
s3fs, MLflow, usearch) are wrapped at the boundary with ``raise ... from e`` so
the original stays in the traceback.

    EmbrayError
    ├── ConfigError      a config file or option is wrong (exit 2)
    │   └── QueryError   a query's filter, fields or mode is invalid (exit 2; HTTP 422)
    ├── SourceError      the corpus cannot be read or has the wrong shape
    ├── StoreError       the store (local disk or S3) cannot be reached, or a write failed
    ├── RegistryError    the MLflow tracking server / registry cannot be reached, or a call failed
    ├── ModelError       a model backend cannot load or embed
    ├── VersionError     a version is missing, incomplete or inconsistent
    ├── ConflictError    another writer or a committed object is in the way (exit 3)
    └── GateError        a promotion gate refused a version; the message has the numbers (exit 4)
"""

from __future__ import annotations


class EmbrayError(Exception):
    """Base class of every error embray raises on purpose."""

    exit_code = 1


class ConfigError(EmbrayError):
    """The configuration is invalid; the message names the key and the fix."""

    exit_code = 2


class QueryError(ConfigError):
    """A query asks for something the version cannot answer: a filter's unknown column, operator or ill-typed
    value, an unknown field, an unknown mode. The message names the part of the query and the fix."""


class SourceError(EmbrayError):
    """The source corpus is missing, unreadable, or lacks a required column."""


class StoreError(EmbrayError):
    """The version store (local disk or S3) is unreachable or a write failed."""


class RegistryError(EmbrayError):
    """MLflow (tracking server or registry) is unreachable or a call to it failed."""


class ModelError(EmbrayError):
    """A model backend is not installed, cannot load, or returned bad vectors."""


class VersionError(EmbrayError):
    """A version does not exist, is not committed, or does not match its model."""


class ConflictError(EmbrayError):
    """Something already exists where a create-only write was attempted."""

    exit_code = 3


class GateError(EmbrayError):
    """A promotion gate (verify, ANN recall, labelled nDCG) refused a version."""

    exit_code = 4


def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an error on one line, for logs and one-line CLI messages.

    A Ray task's or actor's error is unwrapped to the exception the task raised (its ``cause``); of a message
    that carries a remote traceback the last line is kept (the error itself), of any other the first."""
    cause = getattr(e, "cause", None) or e
    lines = [x for x in str(cause).strip().splitlines() if x.strip()]
    text = (lines[-1] if "Traceback" in str(cause) else lines[0]).strip() if lines else ""
    return f"{type(cause).__name__}: {text}"[:limit]
