"""`embray serve`: Ray Serve on a local (or the configured) Ray, the app deployed, until Ctrl-C.

In order: the placement check (:mod:`embray.serving.placement`: refused at once on a local Ray of this
process, waited for up to ``serve.placement_timeout_s`` on a cluster), Serve's proxy, the ``embray-readyz``
application (:mod:`embray.serving.readiness`), the ``embray`` application, deployed without blocking and
then watched until it runs. Every step checks for a stop request, and the signals are read by a thread
(:class:`Stopper`), so Ctrl-C acts in every state: the first SIGINT or SIGTERM starts a clean shutdown
(Serve shut down, a local Ray stopped) that is cut short after :data:`SHUTDOWN_S`; a second one exits at
once. The exit status is then 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from ray import serve

from embray.config import Config
from embray.errors import ConfigError, EmbrayError
from embray.pipeline.warm import release_warm, warm_actors
from embray.runtime import cluster_address, init_ray
from embray.serving.builder import application
from embray.serving.placement import parts, ray_nodes, shortfall
from embray.serving.readiness import APP, READYZ_APP, ROUTE, readyz, why_not_running

log = logging.getLogger("embray.serve")


HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
SHUTDOWN_S = 15.0  # a clean shutdown still running this long after the first signal is cut short
POLL_S = 0.5  # how often the deploy watch asks Serve for the application's status
NOTE_S = 15.0  # how often it says what it is still waiting for
READYZ_START_S = 120.0  # the embray-readyz replica (no CPU, no model) is up within this, or something is wrong
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Stopper:
    """SIGINT and SIGTERM for `embray serve`, in every state.

    Python runs a signal handler only between bytecodes of the main thread, so a handler alone does nothing
    while that thread waits in Ray's C++ code (connecting, deploying). Here the handlers do nothing and the
    signal numbers arrive on a socket (``signal.set_wakeup_fd``) that a thread of its own reads: the first
    signal sets :attr:`event` (the main thread shuts down cleanly) and arms a timer that exits the process
    after ``grace_s``; a second signal exits at once.
    """

    def __init__(self, grace_s: float = SHUTDOWN_S):
        self.grace_s = grace_s
        self.event = threading.Event()
        self.signum: int | None = None
        self._lock = threading.Lock()
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        threading.Thread(target=self._watch, name="embray-signals", daemon=True).start()

    def install(self) -> None:
        """(Again) route SIGINT and SIGTERM here: ``ray.init`` puts a SIGTERM handler of its own in place."""
        for sig in EXIT_CODES:
            signal.signal(sig, lambda *_: None)  # the wakeup socket carries them
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)

    @property
    def stopped(self) -> bool:
        return self.event.is_set()

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + (self.signum or 0)) if self.signum else 0

    def wait(self, seconds: float) -> bool:
        return self.event.wait(seconds)

    def _watch(self) -> None:
        while True:
            try:
                data = self._reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in EXIT_CODES:
                    self._got(signum)

    def _got(self, signum: int) -> None:
        with self._lock:
            first = self.signum is None
            if first:
                self.signum = signum
        if not first:
            log.warning("%s again: exiting now", signal.Signals(signum).name)
            os._exit(EXIT_CODES[signum])
        log.info("%s: stopping (within %gs; again to exit at once)", signal.Signals(signum).name, self.grace_s)
        self.event.set()
        timer = threading.Timer(self.grace_s, self._cut_short)
        timer.daemon = True
        timer.start()

    def _cut_short(self) -> None:
        log.error("the shutdown did not finish within %gs: exiting now", self.grace_s)
        os._exit(self.exit_code)


def run_blocking(cfg: Config, *, haproxy: bool = False) -> int:
    """`embray serve`: start Serve on a local (or the configured) Ray, deploy, serve until Ctrl-C or SIGTERM.

    Returns the exit status: 0, or 130 / 143 after SIGINT / SIGTERM. Raises :class:`ConfigError` when the
    application cannot be placed (:mod:`embray.serving.placement`). ``haproxy`` puts Ray Serve's HAProxy ingress
    in front of the replicas instead of its Python proxy (serve/README.md); it only takes effect for a Ray that
    this process starts.
    """
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
    local = not cluster_address(cfg.ray) and not ray.is_initialized()
    if local and cfg.ray.num_cpus:  # the local Ray's size is known: no need to start it to refuse
        _refuse_if_short(cfg, [{"CPU": float(cfg.ray.num_cpus)}])
    stopper = Stopper()
    stopper.install()
    try:
        try:
            init_ray(cfg.ray)
            stopper.install()  # ray.init replaced the SIGTERM handler
            if not stopper.stopped and _deploy(cfg, stopper, local=local):
                url = f"http://{cfg.serve.host}:{cfg.serve.port}"
                what = "embray serving collection %s at %s (API docs: %s/docs); Ctrl-C stops"
                log.info(what, cfg.collection, url, url)
                while not stopper.wait(POLL_S):
                    pass
        except (SystemExit, KeyboardInterrupt):  # Ray's own handlers, before ours were back in place
            if not stopper.stopped:
                raise
    finally:
        _shutdown(local)
    return stopper.exit_code


def _deploy(cfg: Config, stopper: Stopper, *, local: bool) -> bool:
    """Check placement, start Serve, deploy both applications and wait until ``embray`` runs (True), or until a
    stop request (False). Raises ConfigError when it cannot be placed (at once on a local Ray; after
    ``serve.placement_timeout_s`` on a cluster)."""
    s = cfg.serve
    ps = parts(s)
    if local:
        _refuse_if_short(cfg, ray_nodes())
        short = None
    else:
        short = shortfall(ps, ray_nodes(), local=False)
        _make_room(ps)
    if short:
        log.warning(
            "this Ray cannot hold the application yet: it %s. Deploying anyway and waiting up to %gs "
            "(serve.placement_timeout_s) for nodes that can (an autoscaler adds them on the replicas' demand)",
            short,
            s.placement_timeout_s,
        )
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
    if stopper.stopped:
        return False
    # /readyz first (no CPU, so it runs at once): it then answers while the application deploys.
    _submit(readyz({"app": APP}), READYZ_APP, ROUTE)
    if not _await_app(READYZ_APP, stopper, READYZ_START_S):
        return False
    _submit(application(cfg), APP, "/")
    return _await_running(cfg, stopper, ps, local=local)


def _submit(app, name: str, route_prefix: str) -> None:
    """Deploy ``app`` without waiting for it to run (we watch it ourselves, and say why it waits). Serve's
    public ``serve.run`` always waits until the application runs; ``serve._run(_blocking=False)`` is the same
    call without the wait (Ray 2.x; tests/test_serve.py exercises it through real `embray serve` processes)."""
    serve._run(app, _blocking=False, name=name, route_prefix=route_prefix)


def _status(name: str) -> tuple[str | None, object]:
    app = serve.status().applications.get(name)
    return (str(getattr(app.status, "value", app.status)) if app is not None else None), app


def _await_app(name: str, stopper: Stopper, limit_s: float) -> bool:
    """Until the application ``name`` runs (True), or a stop request (False); raises after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while not stopper.wait(0.1):
        status, app = _status(name)
        if status == "RUNNING":
            return True
        if status == "DEPLOY_FAILED" or time.monotonic() > deadline:
            why = why_not_running(name, app) if app is not None else f"application {name!r} is not deployed"
            raise EmbrayError(f"the Serve application {name!r} did not start within {limit_s:g}s: {why}")
    return False


def _refuse_if_short(cfg: Config, nodes: list[dict[str, float]]) -> None:
    short = shortfall(parts(cfg.serve), nodes, local=True)
    if short:
        raise ConfigError(f"cannot serve {cfg.collection!r}: the application {short}")


def _await_running(cfg: Config, stopper: Stopper, ps: list, *, local: bool) -> bool:
    """Watch the deploy until the application runs; say what it waits for every NOTE_S seconds."""
    t0 = time.monotonic()
    note = t0 + NOTE_S
    limit = cfg.serve.placement_timeout_s
    while not stopper.wait(POLL_S):
        status, app = _status(APP)
        if status == "RUNNING":
            return True
        if status == "DEPLOY_FAILED":
            raise EmbrayError(f"the Serve application did not deploy: {' '.join((app.message or '').split())[:2000]}")
        waited = time.monotonic() - t0
        short = None if local else shortfall(ps, ray_nodes(), local=False)
        if short and waited >= limit:
            raise ConfigError(
                f"cannot serve {cfg.collection!r}: the application {short} (waited {limit:g}s for nodes: "
                "serve.placement_timeout_s)"
            )
        if time.monotonic() >= note:
            note += NOTE_S
            what = f"nodes: the application {short}" if short else (why_not_running(APP, app) if app else APP)
            log.info("waiting %.0fs for %s", waited, what)
    return False


def _make_room(ps: list) -> None:
    """On a Ray shared with other work: let the warm embedding actors go when what is free now would not hold
    the application (they give way to a build the same way; the next small job loads its model again)."""
    import ray

    free = ray.available_resources()
    if any(sum(p.count * p.need.get(k, 0.0) for p in ps) > free.get(k, 0.0) + 1e-9 for p in ps for k in p.need):
        if warm_actors():
            release_warm("room for the Serve application")


def _shutdown(local: bool) -> None:
    """Serve shut down (its replicas, proxies, controller) and, if this process started it, the local Ray."""
    import ray

    log.info("stopping")
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            if local:
                ray.shutdown()
    log.info("stopped")
