"""The Ray Serve application (:mod:`embray.serving.app`), its HTTP schemas, metrics, and `embray serve`."""

from embray.serving.app import application, build

__all__ = ["application", "build"]
