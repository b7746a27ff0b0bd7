"""Stage 3, embed: the planned chunks go through a Ray Data actor pool (or, for a handful of rows, a warm
actor that already holds the model, else one plain Ray task); each finished chunk becomes one file of the
vector cache, keyed by (fingerprint, content_hash), written whole or not at all, so a rerun after a crash
finds it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from embray.build.chunks import EmbedChunks
from embray.build.types import Chunk
from embray.build.warm import embed_warm, make_room
from embray.config import EmbedConfig, RayConfig
from embray.errors import ConfigError
from embray.models.spec import ModelSpec
from embray.store import Store

log = logging.getLogger("embray")

# Up to this many embed.batch_size batches are embedded in one Ray task (or a warm actor) rather than an actor pool.
SMALL_EMBED_BATCHES = 4


def _embed_in_task(spec: ModelSpec, fp: str, threads: int | None, store: Store, chunks: list[Chunk]) -> int:
    embed = EmbedChunks(spec, fp, threads, store)
    return sum(embed.embed_into(store, [c.need for c in chunks], [c.cache for c in chunks]))


def check_pool_fits(ec: EmbedConfig, rc: RayConfig) -> None:
    """On a local Ray, refuse an actor pool that would leave the scan and shard tasks no CPU (a hang)."""
    import ray

    if rc.address:
        return  # a cluster may autoscale: let Ray place the actors
    cpus = ray.cluster_resources().get("CPU", 0)
    need = ec.actors * ec.num_cpus
    if ec.num_gpus == 0 and need >= cpus:
        raise ConfigError(
            f"embed.actors x embed.num_cpus = {need:g} CPUs, but this local Ray has {cpus:g}: the scan and shard "
            "tasks would get no CPU and the job would hang; lower embed.actors or embed.num_cpus"
        )


def embed_chunks(
    ec: EmbedConfig,
    spec: ModelSpec,
    fp: str,
    store: Store,
    chunks: list[Chunk],
    on_rows: Callable[[int], None] | None = None,
) -> int:
    """Embed every planned chunk into the cache; returns the rows embedded.

    Bulk work streams through a Ray Data actor pool. A handful of rows (a typical refresh) goes to the warm
    actor of this model (``embed.keep_warm_s > 0``: made on first use, it keeps the model loaded between
    jobs), or else to one plain Ray task: the pool's start-up would cost more than the work. ``on_rows`` hears
    of every finished chunk's rows.
    """
    import ray
    from ray.data import ActorPoolStrategy

    if not chunks:
        return 0
    on_rows = on_rows or (lambda n: None)
    if sum(c.rows for c in chunks) <= SMALL_EMBED_BATCHES * ec.batch_size:
        if ec.keep_warm_s > 0:
            rows = embed_warm(ec, spec, fp, store, chunks)
            if rows is not None:
                on_rows(rows)
                return rows
        task = ray.remote(num_cpus=ec.num_cpus, num_gpus=ec.num_gpus)(_embed_in_task)
        rows = ray.get(task.remote(spec, fp, ec.threads, store, chunks))
        on_rows(rows)
        return rows
    # Warm actors give way to the pool. Measured on a 2-CPU local Ray: a 1-CPU pool beside a 1-CPU warm actor
    # finishes (the pool's input comes from the driver, no read tasks), so only the pool's own needs count.
    make_room(ec.actors * ec.num_cpus, ec.actors * ec.num_gpus, "an embedding actor pool needs room")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") != "1"  # the CLI's own display
    ds = ray.data.from_items(
        [{"need": c.need, "cache": c.cache} for c in chunks], override_num_blocks=len(chunks)
    ).map_batches(
        EmbedChunks,
        batch_size=1,
        compute=ActorPoolStrategy(size=ec.actors),
        num_cpus=ec.num_cpus,
        num_gpus=ec.num_gpus,
        fn_constructor_kwargs={"spec": spec, "expected_fingerprint": fp, "threads": ec.threads, "store": store},
    )
    done = 0
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows = int(b["rows"].sum())
        on_rows(rows)
        done += rows
    return done
