"""The handles every operation on a collection needs: its config, its store and its MLflow registry.

Made once per :class:`embray.Collection` (each handle lazily, on first use) and passed down to the
operations, so nothing rebuilds a client from the config.
"""

from __future__ import annotations

import functools

from embray.config import Config
from embray.lifecycle.registry import Registry
from embray.progress import NullProgress, Progress
from embray.storage.store import Store


class Context:
    """``cfg`` plus a :class:`Store` and a :class:`Registry`, each made once, when first used."""

    def __init__(self, cfg: Config, progress: Progress | None = None):
        self.cfg = cfg
        self.progress: Progress = progress or NullProgress()  # where long operations report how far they got

    @property
    def collection(self) -> str:
        return self.cfg.collection

    @functools.cached_property
    def store(self) -> Store:
        return Store(self.cfg.store.uri, self.cfg.store.storage_options)

    @functools.cached_property
    def registry(self) -> Registry:
        return Registry(self.cfg)

    def with_config(self, cfg: Config) -> Context:
        """The same handles under a changed config (same store and MLflow; e.g. another shard count)."""
        other = Context(cfg, self.progress)
        for name in ("store", "registry"):
            if name in self.__dict__:
                other.__dict__[name] = self.__dict__[name]
        return other
