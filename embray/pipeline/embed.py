"""Stage 3, embed: the planned chunks go through a Ray Data actor pool (or, for a job one worker finishes
sooner than a pool starts, a warm actor that already holds the model, else one plain Ray task); each
finished chunk becomes one file of the vector cache, keyed by (fingerprint, content_hash), written whole or
not at all, so a rerun after a crash finds it."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from embray.config import EmbedConfig, RayConfig
from embray.errors import ConfigError, ModelError
from embray.models.spec import ModelSpec
from embray.pipeline.chunks import EmbedChunks
from embray.pipeline.types import Chunk, Embedded
from embray.pipeline.warm import embed_warm, make_room, memory_bytes, shown, worker_needs
from embray.runtime import cluster_address
from embray.storage.store import Store

log = logging.getLogger("embray")

T = TypeVar("T")
WATCH_S = 2.0  # how often a waiting embed stage checks that a node still offers what its actors need

# Up to this many embed.batch_size batches are embedded in one Ray task (or a warm actor) rather than an actor pool.
SMALL_EMBED_BATCHES = 4
# So is a job that earlier builds of the model say one worker embeds within this many seconds: an actor pool's
# start (a new process, imports, the model's load, Ray Data's executor) costs about 2 s even for the `hash`
# model on 2 CPUs, which was most of a 1% refresh's embed stage at 1M rows (8,000 texts in 1.8 s).
ONE_WORKER_S = 5.0


def one_worker(ec: EmbedConfig, rows: int, texts_per_s: float | None) -> bool:
    """Whether ``rows`` texts go to one worker (the warm actor or a plain task) instead of an actor pool: a
    few batches, or (``texts_per_s``: the embedding rate of earlier builds with this model, from MLflow) work
    that one worker finishes within :data:`ONE_WORKER_S`, sooner than a pool would start."""
    if rows <= SMALL_EMBED_BATCHES * ec.batch_size:
        return True
    return bool(texts_per_s) and rows / texts_per_s * ec.actors <= ONE_WORKER_S


def solo(ec: EmbedConfig) -> EmbedConfig:
    """``ec`` for the one worker that takes a small job: the whole pool's CPUs and threads in one process (an
    actor pool of 2 x 0.5 CPU x 1 thread: one worker of 1 CPU x 2 threads; threads null stays null: all cores)."""
    if ec.actors is None or ec.actors == 1:
        return ec
    threads = ec.threads * ec.actors if ec.threads else None
    return ec.model_copy(update={"actors": 1, "num_cpus": ec.num_cpus * ec.actors, "threads": threads})


def _embed_in_task(spec: ModelSpec, fp: str, threads: int | None, store: Store, chunks: list[Chunk]):
    """One worker embeds the chunks in turn, yielding an :class:`Embedded` as each lands in the cache (a Ray
    streaming generator: the caller reports progress per chunk)."""
    embed = EmbedChunks(spec, fp, threads, store)
    for c in chunks:
        yield embed.report(sum(embed.embed_into(store, [c.need], [c.cache])))


def check_pool_fits(ec: EmbedConfig, rc: RayConfig) -> None:
    """On a local Ray, refuse an actor pool that would leave the scan and shard tasks no CPU (a hang)."""
    import ray

    if cluster_address(rc) or ec.actors is None:
        return  # a cluster may autoscale: let Ray place the actors; a layout left to the machine fits it
    cpus = ray.cluster_resources().get("CPU", 0)
    need = ec.actors * ec.num_cpus
    if ec.num_gpus == 0 and need >= cpus:
        raise ConfigError(
            f"embed.actors x embed.num_cpus = {need:g} CPUs, but this local Ray has {cpus:g}: the scan and shard "
            "tasks would get no CPU and the job would hang; lower embed.actors or embed.num_cpus"
        )


def _offered(need: dict[str, float]) -> tuple[bool, list[dict]]:
    """Whether an alive node offers ``need`` (in total, not only free now), and the alive nodes."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return any(all(n["Resources"].get(k, 0.0) >= v - 1e-9 for k, v in need.items()) for n in nodes), nodes


def _watched(items: Iterator[T], ec: EmbedConfig) -> Iterator[T]:
    """``items`` (drawn in a thread), failing once no alive node has offered what an embedding actor needs for
    embed.placement_timeout_s: its node was lost mid-build and none can take its actors or tasks over, where
    Ray would wait for one forever. The chunks finished before are in the vector cache; a rerun resumes."""
    need = worker_needs(ec)
    q: queue.Queue = queue.Queue(maxsize=2)
    end = object()

    def pump() -> None:
        try:
            for item in items:
                q.put(item)
            q.put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            q.put(e)

    threading.Thread(target=pump, name="embray-embed", daemon=True).start()
    lost_since: float | None = None
    while True:
        try:
            item = q.get(timeout=WATCH_S)
        except queue.Empty:
            ok, nodes = _offered(need)
            lost_since = None if ok else (lost_since or time.monotonic())
            if lost_since is not None and time.monotonic() - lost_since >= ec.placement_timeout_s:
                wanted = shown(need)
                raise ModelError(
                    f"the embedding stage lost its node: no alive Ray node has offered what an embedding actor "
                    f"needs ({wanted}) for {ec.placement_timeout_s:g}s (embed.placement_timeout_s; {len(nodes)} "
                    "node(s) alive); the chunks embedded before are in the vector cache, so rerun the command "
                    "once such a node is back and it embeds only the rest"
                ) from None
            continue
        lost_since = None
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def wait_for_node(ec: EmbedConfig, rc: RayConfig) -> None:
    """Return once an alive node offers what one embedding actor reserves; else fail naming what is missing:
    at once on a local Ray of this process (no node will join it), after embed.placement_timeout_s on a
    cluster (an autoscaler may be adding one). Without this, Ray would wait for such a node forever."""
    need = worker_needs(ec)  # what one embedding actor or task reserves
    waited = ec.placement_timeout_s if cluster_address(rc) else 0.0
    deadline = time.monotonic() + waited
    while True:
        ok, nodes = _offered(need)
        if ok:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    wanted = shown(need)
    offered = "; ".join(
        shown({k: v for k, v in sorted(n["Resources"].items()) if k in need or k in ("CPU", "GPU")})
        or "nothing asked for"
        for n in nodes
    )
    custom = [k for k in ec.resources if not any(k in n["Resources"] for n in nodes)]
    short = "memory" in need and not any(n["Resources"].get("memory", 0.0) >= need["memory"] for n in nodes)
    hint = (
        f"no alive node has resource {', '.join(custom)}: start one with `ray start --resources "
        f"'{{\"{custom[0]}\": 1}}'` or change embed.resources"
        if custom
        else "add a node with that memory free, or set embed.memory_gib lower (0: declare none)"
        if short
        else "add such a node, or lower embed.num_cpus / embed.num_gpus / embed.resources"
    )
    raise ConfigError(
        f"no alive Ray node offers what an embedding actor needs ({wanted}) after "
        f"{waited:g}s; the {len(nodes)} alive node(s) offer: "
        f"{offered or 'none'}; {hint}"
    )


def costliest_first(chunks: list[Chunk]) -> list[Chunk]:
    """The chunks in the order the pool gets them: by cost (characters, each text counted up to
    :data:`~embray.pipeline.types.COST_CHARS`), then rows, biggest first."""
    # Costliest chunks first (longest processing time first): the pool deals chunks out in turn and queues
    # several per actor, so in shard order (each shard's full chunks, then its small last one) one actor could
    # get the full ones and the other the small ones. Measured (1,190 man pages, bf16, 2 actors x 1 thread):
    # backfill 39.6-53.9 s in shard order (5 runs), 39.0-40.2 s by rows (2). The cost is the characters (each text's up
    # to COST_CHARS), then the rows: a shard's last chunk holds its fewest but longest texts (chunks are
    # cut from texts sorted by length), and by rows alone those came last and left one actor finishing alone
    # (6,000 docstrings, 2 x 1: the two actors finished 5 s apart).
    return sorted(chunks, key=lambda c: (-c.chars, -c.rows))


def embed_chunks(
    ec: EmbedConfig,
    spec: ModelSpec,
    fp: str,
    store: Store,
    chunks: list[Chunk],
    on_rows: Callable[[int], None] | None = None,
    texts_per_s: float | None = None,
) -> Embedded:
    """Embed every planned chunk into the cache; returns the rows embedded and the nodes they ran on.

    Bulk work streams through a Ray Data actor pool. A small job (a typical refresh: :func:`one_worker`, by
    its batches or by ``texts_per_s``, the rate of earlier builds) goes to the warm actor of this model
    (``embed.keep_warm_s > 0``: made on first use, it keeps the model loaded between jobs), or else to one
    plain Ray task: the pool's start-up would cost more than the work. Each of them
    reserves embed.num_cpus, num_gpus and resources, so it runs only on a node that offers them (the caller
    checks that one exists: :func:`wait_for_node`). ``on_rows`` hears of every finished chunk's rows.
    """
    import ray
    from ray.data import ActorPoolStrategy

    if not chunks:
        return Embedded(0)
    on_rows = on_rows or (lambda n: None)
    if one_worker(ec, sum(c.rows for c in chunks), texts_per_s):
        ec = solo(ec)
        if ec.keep_warm_s > 0:
            done = embed_warm(ec, spec, fp, store, chunks)
            if done is not None:
                on_rows(done.rows)
                return done
        task = ray.remote(
            num_cpus=ec.num_cpus, num_gpus=ec.num_gpus, resources=ec.resources or None, memory=memory_bytes(ec) or None
        )(_embed_in_task)
        done = Embedded(0)
        for part in _watched((ray.get(ref) for ref in task.remote(spec, fp, ec.threads, store, chunks)), ec):
            on_rows(part.rows)
            done += part
        return done
    # Warm actors give way to the pool. Measured on a 2-CPU local Ray: a 1-CPU pool beside a 1-CPU warm actor
    # finishes (the pool's input comes from the driver, no read tasks), so only the pool's own needs count.
    pool = {k: v * ec.actors for k, v in {**ec.resources, "memory": memory_bytes(ec)}.items() if v}
    make_room(ec.actors * ec.num_cpus, ec.actors * ec.num_gpus, "an embedding actor pool needs room", resources=pool)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") != "1"  # the CLI's own display
    placement = {"resources": ec.resources} if ec.resources else {}
    chunks = costliest_first(chunks)
    ds = ray.data.from_items(
        [{"need": c.need, "cache": c.cache} for c in chunks], override_num_blocks=len(chunks)
    ).map_batches(
        EmbedChunks,
        batch_size=1,
        compute=ActorPoolStrategy(size=ec.actors),
        num_cpus=ec.num_cpus,
        num_gpus=ec.num_gpus,
        memory=memory_bytes(ec) or None,
        fn_constructor_kwargs={"spec": spec, "expected_fingerprint": fp, "threads": ec.threads, "store": store},
        **placement,
    )
    done = Embedded(0)
    for b in _watched(ds.iter_batches(batch_size=None, batch_format="numpy"), ec):
        part = Embedded(
            int(b["rows"].sum()),
            tuple(sorted({str(n) for n in b["node"]})),
            tuple(sorted({str(c) for c in b["compute"]})),
            float(b["rss_mib"].max()) if len(b["rss_mib"]) else None,
        )
        on_rows(part.rows)
        done += part
    return done
