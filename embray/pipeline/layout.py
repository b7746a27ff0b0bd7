"""The embedding workers' layout: how many actors, of how many CPUs and threads, and the memory each declares.

``embed.actors: null`` (the default) lets the machine decide. On CPU nodes: one single-threaded actor per
core (measured on 2 cores: 2 actors x 1 thread was as fast or faster than 1 x 2 on long texts and up to 1.44x
on short ones; docs/benchmarks.md), each reserving an equal share of the cores but one (that one is the scan,
plan and shard tasks'), and no more actors than the node's memory holds at the worker's declared memory. With
``embed.num_gpus``: one actor per that many GPUs. Each actor, task or warm actor declares ``memory=`` to Ray
(:func:`worker_memory`), so Ray places them only where that memory is free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from embray.config import GIB, EmbedConfig
from embray.models.spec import ModelSpec, resolve_model_path

MIB = 1 << 20
TASK_CPUS = 1.0  # left free on a node of auto-sized actors, for the scan, plan and shard tasks
HEADROOM = 1.25  # declared memory = this x the largest peak RSS this model's workers reached before
# Before any build of the model has measured its workers: a Ray worker with torch and the tokenizer imported
# plus this many times the weight files (a copy in the compute dtype, oneDNN's state per compiled batch shape,
# activations). Measured, MiniLM (91 MB of weights), 2-CPU AMD EPYC, the largest actor's peak RSS in whole
# backfills (bench/backfill.py, docs/benchmarks.md, 4c32f51: one fused width): 0.72-0.93 GiB on man pages,
# 0.79 (bf16) - 0.99 GiB (fp32) on docstrings. MiniLM's estimate: 0.6 GiB + 8 x 91 MB = 1.28 GiB.
BASE_BYTES = {"hash": int(0.3 * GIB), "onnx": int(0.4 * GIB)}
BASE_TORCH_BYTES = int(0.6 * GIB)
WEIGHTS_FACTOR = 8


@dataclass(frozen=True)
class Layout:
    """What the embed stage runs: ``actors`` workers of ``num_cpus`` CPUs, ``threads`` torch threads (None: the
    node's cores) and ``memory`` bytes each (0: none declared); ``why`` says how they were chosen."""

    actors: int
    num_cpus: float
    threads: int | None
    memory: int
    why: str

    def __str__(self) -> str:
        threads = f"{self.threads} thread(s)" if self.threads else "all cores"
        memory = f", {self.memory / GIB:.2f} GiB" if self.memory else ""
        return f"{self.actors} actor(s) x {threads} ({self.num_cpus:g} CPU{memory} each): {self.why}"

    def apply(self, ec: EmbedConfig) -> EmbedConfig:
        """``ec`` with this layout's actors, CPUs, threads and memory."""
        return ec.model_copy(
            update={
                "actors": self.actors,
                "num_cpus": self.num_cpus,
                "threads": self.threads,
                "memory_gib": self.memory / GIB,  # exact: warm.memory_bytes gives the bytes back
            }
        )


def weights_bytes(spec: ModelSpec) -> int:
    """Bytes of the model's weight files (0 for a model without files, e.g. ``hash``)."""
    if spec.backend == "hash":
        return 0
    try:
        root = resolve_model_path(spec)
    except Exception:  # noqa: BLE001 - an estimate: a model that cannot be found fails later, with its own error
        return 0
    files = root.rglob("*") if root.is_dir() else [root]
    return sum(f.stat().st_size for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".onnx", ".gguf"))


def worker_memory(ec: EmbedConfig, spec: ModelSpec, past_rss_mib: float | None) -> tuple[int, str]:
    """Bytes each embedding worker declares to Ray, and where the figure comes from: ``embed.memory_gib`` when
    set (0: none); else :data:`HEADROOM` x the largest peak RSS this model's workers reached in this
    collection's earlier builds (MLflow metric ``embed.worker_peak_rss_mib``); else an estimate from the
    model's weight files."""
    if ec.memory_gib is not None:
        return int(ec.memory_gib * GIB), "embed.memory_gib"
    if past_rss_mib:
        return int(past_rss_mib * MIB * HEADROOM), f"{HEADROOM:g} x the {past_rss_mib:.0f} MiB peak of earlier builds"
    base = BASE_BYTES.get(spec.backend, BASE_TORCH_BYTES)
    return base + WEIGHTS_FACTOR * weights_bytes(spec), "estimated from the weight files (no build measured it yet)"


def choose(ec: EmbedConfig, spec: ModelSpec, nodes: list[dict], memory: tuple[int, str]) -> Layout:
    """The layout for ``ec`` on the alive Ray ``nodes`` (``ray.nodes()`` entries): the configured one where
    ``embed.actors`` is set, else one sized to the machine (see the module's notes)."""
    mem, mem_why = memory
    if ec.actors is not None:
        return Layout(ec.actors, ec.num_cpus, ec.threads, mem, f"embed.actors; memory: {mem_why}")
    eligible = [
        n["Resources"]
        for n in nodes
        if n.get("Alive") and all(n["Resources"].get(k, 0.0) >= v for k, v in ec.resources.items())
    ]
    if ec.num_gpus > 0:
        gpus = sum(r.get("GPU", 0.0) for r in eligible)
        actors = max(1, math.floor(gpus / ec.num_gpus + 1e-9))
        why = f"one per {ec.num_gpus:g} GPU(s) of {gpus:g}"
        return Layout(actors, ec.num_cpus, ec.threads, mem, f"{why}; memory: {mem_why}")
    actors, cpus = 0, 0.0
    for r in eligible:
        cores = int(r.get("CPU", 0.0))
        fits = [math.floor(r.get(k, 0.0) / v + 1e-9) for k, v in {**ec.resources, "memory": mem}.items() if v]
        actors += max(0, min([cores, *fits]))
        cpus = max(cpus, r.get("CPU", 0.0))
    if actors == 0 or cpus <= TASK_CPUS:  # one core, or no memory for one: the configured single actor
        return Layout(1, ec.num_cpus, ec.threads, mem, f"a node of {cpus:g} CPU(s): one actor; memory: {mem_why}")
    per_node = min(int(cpus), actors)
    share = round(min(1.0, (cpus - TASK_CPUS) / per_node), 3)
    threads = ec.threads or 1
    why = f"one per core of {len(eligible)} node(s) of up to {cpus:g} CPUs, within their memory; memory: {mem_why}"
    if ec.resources:
        why = why.replace("within their memory", "within their memory and embed.resources")
    return Layout(actors, share, threads, mem, why)


__all__ = ["Layout", "choose", "weights_bytes", "worker_memory"]
