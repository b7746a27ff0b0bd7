"""embray: embeddings as a managed, versioned asset on Ray, USearch and MLflow.

    from embray import Collection

    docs = Collection.open("embray.yaml")
    docs.backfill()
    print(docs.search("parse a date string", k=5).to_dict())

The public surface is what this module exports: :class:`Collection`, the configuration, the typed
results every operation returns, model specs and embedders (for users who embed their own queries),
and the errors. Everything else is private or lives in subpackages.
"""

from embray.collection import Collection
from embray.config import Config, load_config
from embray.errors import (
    ConfigError,
    ConflictError,
    EmbrayError,
    GateError,
    ModelError,
    QueryError,
    RegistryError,
    SourceError,
    StoreError,
    VersionError,
)
from embray.models import Embedder, ModelSpec, fingerprint, load_embedder
from embray.results import (
    AuditReport,
    BuildResult,
    Counts,
    EvalReport,
    Gate,
    GateReport,
    GcResult,
    Hit,
    MonitorAction,
    PlanResult,
    PromoteResult,
    RollbackResult,
    SearchResult,
    Staleness,
    StatusReport,
    VerifyReport,
    VersionInfo,
    VersionSummary,
)
from embray.search import VersionIndex

__all__ = [
    "AuditReport",
    "BuildResult",
    "Collection",
    "Config",
    "ConfigError",
    "ConflictError",
    "Counts",
    "Embedder",
    "EmbrayError",
    "EvalReport",
    "Gate",
    "GateError",
    "GateReport",
    "GcResult",
    "Hit",
    "ModelError",
    "QueryError",
    "ModelSpec",
    "MonitorAction",
    "PlanResult",
    "PromoteResult",
    "RegistryError",
    "RollbackResult",
    "SearchResult",
    "SourceError",
    "Staleness",
    "StatusReport",
    "StoreError",
    "VerifyReport",
    "VersionError",
    "VersionIndex",
    "VersionInfo",
    "VersionSummary",
    "fingerprint",
    "load_config",
    "load_embedder",
]
__version__ = "0.1.0"
