"""Ray, started once per process, and waiting on groups of tasks."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from embray.config import RayConfig
from embray.errors import ConfigError

_LOG_TO_DRIVER = True  # the CLI turns it off on a terminal: workers' output goes to Ray's log files


def quiet_workers() -> None:
    """Keep Ray workers' output (model loading bars, library warnings) in Ray's log files, off this terminal."""
    global _LOG_TO_DRIVER
    _LOG_TO_DRIVER = False


def init_ray(rc: RayConfig) -> None:
    """Connect to the configured Ray cluster, or start a local one (once per process).

    ``ray.address`` null means the Ray this process is meant for: inside a Ray job (the job's driver has
    ``RAY_ADDRESS`` set, as has a shell that exported it) that cluster; anywhere else a new local Ray of this
    process, never a cluster that ``ray start`` left on this machine (Ray itself would join the one named in
    its ``ray_current_cluster`` file; use ``address: auto`` for that). ``ray.num_cpus`` sizes a local Ray only.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": _LOG_TO_DRIVER, "include_dashboard": False}
    address = cluster_address(rc)
    if address:
        kwargs["address"] = address
    else:
        kwargs["address"] = "local"
        if rc.num_cpus:
            kwargs["num_cpus"] = rc.num_cpus
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise ConfigError(f"ray.address {address!r}: cannot connect ({e}); check the address or use null") from e


def cluster_address(rc: RayConfig) -> str | None:
    """The cluster this process runs on (``ray.address``, else ``RAY_ADDRESS``), or None for a local Ray of its
    own, which no other node will ever join."""
    return rc.address or os.environ.get("RAY_ADDRESS") or None


def gather(refs: list, on_done: Callable[[int], None] | None = None) -> list:
    """``ray.get`` of several tasks; when one fails, wait for the others to end before raising, so that
    nothing is still writing when the caller cleans up. (No ``ray.cancel``: in Ray 2.60 cancelling a task
    that is finishing can abort the driver, "Tried to complete task that was not pending".)"""
    import ray

    try:
        if on_done is not None:  # report each task as it ends (the results still come back in order)
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready)  # raises at once if that task failed
                on_done(len(ready))
        return ray.get(refs)
    except BaseException:
        ray.wait(refs, num_returns=len(refs), timeout=300)
        raise
