"""Ray Serve entry point: `serve deploy serve/config.yaml`, or `serve run serve.app:build config=embray.yaml`.

The application itself lives in `embray.serving`; this module only names its builder.
"""

from embray.serving import build

__all__ = ["build"]
