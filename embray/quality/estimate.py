"""What a build will cost, before it runs: texts to embed, shards touched, wall time, CPU/GPU hours, store bytes.

The time comes from this collection's earlier builds with the same model (fingerprint), as MLflow recorded
them (texts embedded / embedding seconds, and the rest of each build's time per row); with none, the
estimate says so and gives no time. Pure functions here; the MLflow reads are in :func:`throughput_history`.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

from embray.config import Config
from embray.errors import EmbrayError
from embray.lifecycle.registry import Registry
from embray.results import Estimate

log = logging.getLogger("embray")

MIN_EMBEDDED = 50  # builds that embedded fewer texts say little about throughput (model load dominates)


@dataclass(frozen=True)
class PastBuild:
    """One earlier build's rates, from its MLflow run."""

    run_id: str
    embedded: int
    embed_seconds: float
    other_seconds: float  # everything but embedding (scan, plan, shards, commit)
    rows: int
    worker_rss_mib: float | None = None  # its largest embedding worker's peak RSS (metric embed.worker_peak_rss_mib)


def throughput_history(registry: Registry, fingerprint: str, limit: int = 20) -> list[PastBuild]:
    """Finished builds of this collection with model ``fingerprint``, newest first (empty when MLflow has none)."""
    try:
        runs = registry.finished_build_runs(fingerprint, limit)
    except EmbrayError as e:  # an estimate is advice: MLflow being unreachable is said, not fatal
        log.warning("no throughput history (MLflow: %s)", e)
        return []
    out = []
    for run_id, m in runs:
        if {"embedded", "embed_seconds", "seconds", "rows"} <= m.keys():
            out.append(
                PastBuild(
                    run_id,
                    int(m["embedded"]),
                    float(m["embed_seconds"]),
                    max(0.0, float(m["seconds"]) - float(m["embed_seconds"])),
                    int(m["rows"]),
                    m.get("embed.worker_peak_rss_mib"),
                )
            )
    return out


def past_worker_rss_mib(history: list[PastBuild]) -> float | None:
    """The largest peak RSS an embedding worker of this model reached in the recent builds that measured one."""
    return max((h.worker_rss_mib for h in history if h.worker_rss_mib), default=None)


def bytes_per_row(dims: int, index_dtype: str, connectivity: int) -> float:
    """Store bytes a row adds: its embeddings-part row (float32 vector, id, key, hash) and its HNSW entry."""
    scalar = {"f32": 4, "f16": 2, "bf16": 2, "i8": 1}[index_dtype]
    part = dims * 4 + 8 + 64 + 24  # vector, key, content hash (hex), a typical id
    index = dims * scalar + 2 * connectivity * 4 + 16  # vector, level-0 neighbours (uint32), bookkeeping
    return float(part + index)


def estimate(
    cfg: Config,
    *,
    to_embed: int,
    rows: int,
    rows_written: int,
    shards: dict[str, int],
    dims: int | None,
    history: list[PastBuild],
) -> Estimate:
    """The cost of a build that embeds ``to_embed`` texts and writes ``rows_written`` rows into new shard files."""
    useful = [h for h in history if h.embedded >= MIN_EMBEDDED and h.embed_seconds > 0]
    seconds = cpu_h = gpu_h = texts_per_s = None
    if useful:
        texts_per_s = statistics.median(h.embedded / h.embed_seconds for h in useful)
        other_per_row = statistics.median(h.other_seconds / max(h.rows, 1) for h in useful)
        embed_s = to_embed / texts_per_s
        seconds = embed_s + other_per_row * rows
        ec = cfg.embed
        cpu_h = embed_s * ec.actors * ec.num_cpus / 3600
        gpu_h = embed_s * ec.actors * ec.num_gpus / 3600
        basis = (
            f"median of {len(useful)} earlier build(s) of this collection with this model: "
            f"{texts_per_s:.1f} texts/s embedding, {other_per_row * 1000:.3f} ms per row for the rest"
        )
    elif history:
        basis = f"no earlier build with this model embedded {MIN_EMBEDDED}+ texts: no time estimate yet"
    else:
        basis = "no earlier build of this collection with this model: no time estimate yet"
    size = None
    if dims:
        size = int(rows_written * bytes_per_row(dims, cfg.index.dtype, cfg.index.connectivity))
    return Estimate(
        to_embed=to_embed,
        shards_rebuilt=shards.get("rebuilt", 0),
        shards_updated=shards.get("updated", 0),
        shards_delta=shards.get("delta", 0),
        shards_reused=shards.get("reused", 0),
        seconds=round(seconds, 1) if seconds is not None else None,
        texts_per_s=round(texts_per_s, 1) if texts_per_s is not None else None,
        cpu_hours=round(cpu_h, 4) if cpu_h is not None else None,
        gpu_hours=round(gpu_h, 4) if gpu_h is not None else None,
        bytes_added=size,
        basis=basis,
    )
