"""Warm models for small jobs: a detached, named Ray actor per fingerprint that keeps a model loaded.

A refresh, audit-sized build or monitor refresh that embeds only a few batches would otherwise spend
most of its time loading the model. With ``embed.keep_warm_s > 0`` such a job asks this Ray for the
actor ``embray-embed-<fingerprint>-<settings>`` in namespace ``embray`` (creating it, with
``get_if_exists``, if there is none), and the actor embeds the chunks into the cache exactly as the
plain task would (the same :class:`EmbedChunks`, the same files and vectors). It exits by itself
``keep_warm_s`` after its last use.

- One space per actor: the name holds the fingerprint (and a digest of the compute settings), and the
  actor refuses (ModelError) any call whose spec does not have its fingerprint.
- Calls are serialised by the actor (``max_concurrency=1``): two jobs may share it.
- It lives as long as the Ray it runs on: a local Ray started in-process by a command dies with the
  command (and the actor with it); on a long-lived Ray (a cluster, ``ray start``, the monitor loop, a
  notebook) it stays warm between jobs.
- It holds the resources the plain task would (``embed.num_cpus`` / ``embed.num_gpus``) while alive, so
  warm actors give way: a build whose stages or actor pool would not fit beside them releases them
  first (:func:`make_room`); a new warm actor is made only where a CPU is left for the other tasks.
- Anything wrong on this path (no room, the actor died, a refusal) falls back to the plain task.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

from embray.config import GIB, EmbedConfig
from embray.errors import ModelError, one_line
from embray.models import fingerprint
from embray.models.spec import ModelSpec
from embray.pipeline.chunks import EmbedChunks
from embray.pipeline.types import Embedded
from embray.storage.store import Store

log = logging.getLogger("embray")

NAMESPACE = "embray"
PREFIX = "embray-embed-"
# A warm actor is made only where this many CPUs stay free beside it, for the scan, plan and shard tasks.
TASK_CPUS = 1.0
# Ray's view of free resources lags a task's end by a moment: wait this long before calling a resource taken.
SETTLE_S = 2.0
# How long a job waits for a warm actor to be ready (placed, model loaded) before it falls back.
READY_TIMEOUT_S = 300.0


def warm_name(spec: ModelSpec, fp: str, ec: EmbedConfig) -> str:
    """The actor's name: the fingerprint, and a digest of what else decides the exact vectors and placement
    (the full spec with its compute settings, threads, resources) and of the embray release (an actor left
    by another release's job is not used)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("embray")
    except PackageNotFoundError:
        release = "unknown"
    resources = sorted(ec.resources.items())
    settings = f"{spec.model_dump_json()}|{ec.threads}|{ec.num_cpus}|{ec.num_gpus}|{resources}|{release}"
    return f"{PREFIX}{fp}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}"


class WarmEmbedder:
    """The detached actor: one loaded model, used by job after job until it has been idle keep_warm_s."""

    def __init__(self, spec: ModelSpec, fp: str, threads: int | None, store: Store, keep_warm_s: float):
        self.spec, self.fp = spec, fp
        self.model = EmbedChunks(spec, fp, threads, store)  # loads the model, after checking its fingerprint
        self.keep_warm_s = keep_warm_s
        self.created = time.time()
        self.last_used = time.monotonic()
        self.busy = self.expiring = False
        self.calls = self.rows = 0
        threading.Thread(target=self._watch, name="embray-keep-warm", daemon=True).start()

    def embed(self, spec: ModelSpec, fp: str, store: Store, needs: list, caches: list, keep_warm_s: float) -> Embedded:
        """Embed the chunks into ``store``'s cache (rows, this node, compute, peak RSS); refuses a spec of
        another space."""
        if fp != self.fp or spec != self.spec or fingerprint(spec) != self.fp:
            raise ModelError(
                f"the warm embedding actor holds {self.spec.label} (fingerprint {self.fp}); it was asked to embed "
                f"{spec.label} (fingerprint {fp}): refused, never another vector space"
            )
        self.busy, self.last_used, self.keep_warm_s = True, time.monotonic(), keep_warm_s
        try:
            rows = sum(self.model.embed_into(store, needs, caches))
        finally:
            self.busy, self.last_used = False, time.monotonic()
        self.calls += 1
        self.rows += rows
        return self.model.report(rows)

    def info(self) -> dict:
        """What the actor holds and has done (the model is loaded once, at creation)."""
        return {
            "fingerprint": self.fp,
            "model": self.spec.label,
            "pid": os.getpid(),
            "created": self.created,
            "loads": 1,
            "calls": self.calls,
            "rows": self.rows,
            "idle_s": time.monotonic() - self.last_used,
            "keep_warm_s": self.keep_warm_s,
        }

    def expire(self) -> bool:
        """Exit if idle for keep_warm_s (runs between calls, so never in the middle of one)."""
        import ray

        if not self.busy and time.monotonic() - self.last_used >= self.keep_warm_s:
            ray.actor.exit_actor()
        self.expiring = False
        return False

    def _watch(self) -> None:
        import ray

        me = ray.get_runtime_context().current_actor
        while True:
            left = self.keep_warm_s - (time.monotonic() - self.last_used)
            if self.expiring or self.busy or left > 0:
                time.sleep(min(max(left, 0.2), 30.0))
                continue
            # One request at a time: an exiting actor must not have more calls to itself queued (it would wait
            # for them). It runs between calls and checks again before exiting.
            self.expiring = True
            me.expire.remote()


def warm_actors() -> list[str]:
    """Names of the warm embedding actors alive on this Ray."""
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].startswith(PREFIX)
    )


def release_warm(reason: str, keep: str | None = None) -> int:
    """Kill every warm embedding actor on this Ray but ``keep``; returns how many. A job using one falls back
    to a plain task, so this only ever costs a model load."""
    import ray

    n = 0
    for name in warm_actors():
        if name == keep:
            continue
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            n += 1
        except ValueError:  # gone already
            continue
    if n:
        log.info("released %d warm embedding actor(s): %s", n, reason)
    return n


def reservation(cpus: float, gpus: float, resources: dict[str, float] | None = None) -> dict[str, float]:
    """Ray resources as one mapping (CPU, GPU, custom, memory in bytes), leaving out what is zero."""
    need = {"CPU": cpus, "GPU": gpus, **(resources or {})}
    return {k: v for k, v in need.items() if v > 0}


def memory_bytes(ec: EmbedConfig) -> int:
    """The memory one embedding worker declares to Ray (``memory=``), bytes; 0: none."""
    return round((ec.memory_gib or 0) * GIB)


def worker_needs(ec: EmbedConfig) -> dict[str, float]:
    """What one embedding actor, task or warm actor reserves: CPU, GPU, custom resources and memory."""
    return reservation(ec.num_cpus, ec.num_gpus, {**ec.resources, "memory": memory_bytes(ec)})


def shown(need: dict[str, float]) -> str:
    """A reservation for a message: memory in GiB, the rest as counts."""
    return ", ".join(f"{k}: {v / GIB:.2f} GiB" if k == "memory" else f"{k}: {v:g}" for k, v in need.items())


def make_room(
    cpus: float,
    gpus: float,
    reason: str,
    keep: str | None = None,
    wait_s: float = 10.0,
    resources: dict[str, float] | None = None,
) -> bool:
    """Whether ``cpus`` / ``gpus`` (and custom ``resources``) are free on this Ray; if not (after a moment for
    tasks that just ended to hand theirs back), release the warm actors (but ``keep``) and wait up to
    ``wait_s`` for their resources."""
    import ray

    need = reservation(cpus, gpus, resources)

    def fits_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            free = ray.available_resources()
            if all(free.get(k, 0.0) >= v - 1e-9 for k, v in need.items()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    if fits_within(SETTLE_S):
        return True
    return release_warm(reason, keep) > 0 and fits_within(wait_s)


def _warm_actor(name: str, ec: EmbedConfig, spec: ModelSpec, fp: str, store: Store):
    """The live actor ``name``, made if there is none and there is room; None where there is no room."""
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    room = {**ec.resources, "memory": memory_bytes(ec)}
    if not make_room(ec.num_cpus + TASK_CPUS, ec.num_gpus, f"room for {name}", keep=name, resources=room):
        log.info("no room for a warm embedding actor (%s and a CPU for tasks)", shown(worker_needs(ec)))
        return None
    return (
        ray.remote(WarmEmbedder)
        .options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=ec.num_cpus,
            num_gpus=ec.num_gpus,
            resources=ec.resources or None,
            memory=memory_bytes(ec) or None,
            max_restarts=0,
            max_concurrency=1,
        )
        .remote(spec, fp, ec.threads, store, ec.keep_warm_s)
    )


def embed_warm(ec: EmbedConfig, spec: ModelSpec, fp: str, store: Store, chunks: list) -> Embedded | None:
    """Embed ``chunks`` in the warm actor of ``spec``; returns what it did, or None when the caller should
    use a plain task instead (no room, the actor died or refused: logged)."""
    import ray

    name = warm_name(spec, fp, ec)
    try:
        actor = _warm_actor(name, ec, spec, fp, store)
        if actor is None:
            return None
        ready, _ = ray.wait([actor.info.remote()], timeout=READY_TIMEOUT_S)
        if not ready:
            ray.kill(actor, no_restart=True)
            raise TimeoutError(f"not ready after {READY_TIMEOUT_S:g}s")
        needs, caches = [c.need for c in chunks], [c.cache for c in chunks]
        return ray.get(actor.embed.remote(spec, fp, store, needs, caches, ec.keep_warm_s))
    except Exception as e:  # noqa: BLE001 - the warm actor is only a shortcut: fall back, never fail here
        log.warning("warm embedding actor %s unusable (%s); embedding in a plain task", name, one_line(e))
        return None
