"""embray: embeddings as a managed, versioned asset on Ray, USearch and MLflow."""

from embray.config import Config, load_config
from embray.errors import (
    ConfigError,
    ConflictError,
    EmbrayError,
    GateError,
    ModelError,
    SourceError,
    StoreError,
    VersionError,
)
from embray.models import Embedder, ModelSpec, fingerprint, load_embedder

__all__ = [
    "Config",
    "ConfigError",
    "ConflictError",
    "Embedder",
    "EmbrayError",
    "GateError",
    "ModelError",
    "ModelSpec",
    "SourceError",
    "StoreError",
    "VersionError",
    "fingerprint",
    "load_config",
    "load_embedder",
]
__version__ = "0.1.0"
