"""Stage 3, embed: the planned chunks go through a Ray Data actor pool (or, for a handful of rows, one
plain Ray task); each finished chunk becomes one file of the vector cache, keyed by (fingerprint,
content_hash), written whole or not at all, so a rerun after a crash finds it."""

from __future__ import annotations

import os
import socket

from embray.build.types import Chunk
from embray.config import EmbedConfig, RayConfig
from embray.errors import ConfigError, ModelError
from embray.models import fingerprint, load_embedder
from embray.models.spec import ModelSpec
from embray.store import Store, local_tmpdir
from embray.vectors import to_arrow, with_fingerprint

# Up to this many embed.batch_size batches are embedded in one Ray task rather than an actor pool.
SMALL_EMBED_BATCHES = 4


class EmbedChunks:
    """One model replica in the Ray Data actor pool; each call embeds whole chunks into the cache."""

    def __init__(self, spec: ModelSpec, expected_fingerprint: str, threads: int | None, store: Store):
        if spec.backend != "hash":
            import torch

            torch.set_num_threads(threads or os.cpu_count() or 1)
        got = fingerprint(spec)
        if got != expected_fingerprint:
            raise ModelError(
                f"worker {socket.gethostname()} resolved {spec.label} to fingerprint {got}, but the job embeds "
                f"{expected_fingerprint}: its weights differ; give every node the same model files"
            )
        self.fp = got
        self.store = store
        self.embedder = load_embedder(spec)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        done = []
        for need, cache in zip(batch["need"], batch["cache"], strict=True):
            chunk = self.store.read_table(str(need))
            vectors = self.embedder.embed_documents(chunk.column("text").to_pylist())
            table = pa.table(
                {"content_hash": chunk.column("content_hash"), "vector": to_arrow(vectors, vectors.shape[1])}
            )
            tmp = local_tmpdir("embray-embed-")
            pq.write_table(with_fingerprint(table, self.fp), str(tmp / "chunk.parquet"))
            self.store.upload(str(tmp / "chunk.parquet"), str(cache))  # whole or not at all: a rerun trusts it
            tmp.rmdir()
            done.append(chunk.num_rows)
        return {"rows": np.array(done, dtype=np.int64)}


def _embed_in_task(spec: ModelSpec, fp: str, threads: int | None, store: Store, chunks: list[Chunk]) -> int:
    embed = EmbedChunks(spec, fp, threads, store)
    return int(embed({"need": [c.need for c in chunks], "cache": [c.cache for c in chunks]})["rows"].sum())


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


def embed_chunks(ec: EmbedConfig, spec: ModelSpec, fp: str, store: Store, chunks: list[Chunk]) -> int:
    """Embed every planned chunk into the cache; returns the rows embedded.

    Bulk work streams through a Ray Data actor pool. A handful of rows (a typical refresh) goes to one
    plain Ray task instead, in an already warm worker: the pool's start-up would cost more than the work.
    """
    import ray
    from ray.data import ActorPoolStrategy

    if not chunks:
        return 0
    if sum(c.rows for c in chunks) <= SMALL_EMBED_BATCHES * ec.batch_size:
        task = ray.remote(num_cpus=ec.num_cpus, num_gpus=ec.num_gpus)(_embed_in_task)
        return ray.get(task.remote(spec, fp, ec.threads, store, chunks))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
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
    return sum(int(b["rows"].sum()) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
