"""The Ray Serve application (:mod:`embray.serving.app`), its HTTP schemas, metrics, and `embray serve`.

The names are imported on first use, so that a replica of the small ``embray-readyz`` application
(:mod:`embray.serving.readiness`) starts without loading the search stack."""

from __future__ import annotations

from typing import Any

__all__ = ["application", "build", "readyz"]


def __getattr__(name: str) -> Any:
    if name in ("application", "build"):
        from embray.serving import builder

        return getattr(builder, name)
    if name == "readyz":  # not `readiness`: that name is the module's
        from embray.serving.readiness import readyz

        return readyz
    raise AttributeError(f"module 'embray.serving' has no attribute {name!r}")
