"""`embray serve`: Ray Serve on a local (or the configured) Ray, the app deployed, until Ctrl-C."""

from __future__ import annotations

import logging
import os
import threading

from ray import serve

from embray.config import Config
from embray.errors import ConfigError
from embray.runtime import init_ray
from embray.serving.app import application

log = logging.getLogger("embray.serve")


HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def run_blocking(cfg: Config, *, haproxy: bool = False) -> None:
    """`embray serve`: start Serve on a local (or the configured) Ray, deploy, block until Ctrl-C or SIGTERM.

    ``haproxy`` puts Ray Serve's HAProxy ingress in front of the replicas instead of its Python proxy
    (serve/README.md); it only takes effect for a Ray that this process starts.
    """
    import signal

    import ray

    if haproxy:
        if cfg.ray.address or ray.is_initialized():
            raise ConfigError(
                "--haproxy applies only to a local Ray that `embray serve` starts; on a cluster set "
                + " ".join(f"{k}={v}" for k, v in HAPROXY_ENV.items())
                + " on every node before `ray start`"
            )
        os.environ.update(HAPROXY_ENV)
        # A local HAProxy is Serve's own and learns of a stopping replica at once: no 30 s drain on Ctrl-C.
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        init_ray(cfg.ray)
        s = cfg.serve
        serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
        serve.run(application(cfg), name="embray", route_prefix="/")
        url = f"http://{cfg.serve.host}:{cfg.serve.port}"
        log.info("embray serving collection %s at %s (API docs: %s/docs); Ctrl-C stops", cfg.collection, url, url)
        while not stop.wait(0.5):
            pass
    finally:
        log.info("stopping")
        serve.shutdown()
        log.info("stopped")
