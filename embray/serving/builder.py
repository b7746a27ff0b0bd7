"""The application builders: :func:`build` for ``serve deploy`` / KubeRay (``import_path: embray.serving:build``)
and :func:`application` for Python (``serve.run(application(cfg))``, `embray serve`)."""

# No `from __future__ import annotations`: Serve inspects the deployments' signatures.
import os
from typing import Any

from embray.config import Config, load_config
from embray.errors import ConfigError
from embray.serving.app import EmbrayServer
from embray.serving.groups import EmbrayShardGroup, group_deployment


def build(args: dict[str, Any]):
    """Application builder for `serve deploy` / `serve run`: ``args: {config: path/to/embray.yaml}``."""
    path = args.get("config") or os.environ.get("EMBRAY_CONFIG")
    if not path:
        raise ConfigError("the Serve application needs `args: {config: path/to/embray.yaml}` or EMBRAY_CONFIG")
    return application(load_config(path), os.path.dirname(os.path.abspath(path)))


def application(cfg: Config, base_dir: str = "."):
    """The bound application for ``cfg`` (replicas and limits from ``cfg.serve``): the ingress EmbrayServer and,
    with ``serve.shard_groups`` G > 1, the deployments EmbrayShardGroup0..G-1 it fans out to (made from the
    embray config alone, so a deploy config only overrides their autoscaling by name)."""
    payload = {"data": cfg.model_dump(mode="json"), "base_dir": base_dir}
    s = cfg.serve
    G = s.shard_groups
    groups = [
        EmbrayShardGroup.options(
            name=group_deployment(g),
            num_replicas=s.group_replicas,
            max_ongoing_requests=s.max_ongoing_requests,
            max_queued_requests=s.max_queued_requests,
            ray_actor_options={"num_cpus": s.group_num_cpus},
        ).bind(payload, g, G)
        for g in range(G)
    ]
    ingress = EmbrayServer.options(
        num_replicas=s.replicas,
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.num_cpus},
    )
    return ingress.bind(payload, groups) if G > 1 else ingress.bind(payload)
