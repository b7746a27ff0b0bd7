"""One loaded model that embeds whole planned chunks into the vector cache.

:class:`EmbedChunks` is what every embedding path holds: the Ray Data actor pool (bulk), the plain Ray
task (a few batches) and the warm actor of :mod:`embray.pipeline.warm` (a few batches, model already
loaded). Each finished chunk is written whole (rename or S3 put) into the cache, so a rerun trusts it.
"""

from __future__ import annotations

import os
import resource
import socket
import sys

from embray.errors import ModelError
from embray.models import fingerprint, load_embedder
from embray.models.spec import ModelSpec
from embray.pipeline.types import Embedded
from embray.storage.store import Store, local_tmpdir
from embray.storage.vectors import to_arrow, with_fingerprint


def node_id() -> str:
    """The Ray node this process runs on (hex id)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux: VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


class EmbedChunks:
    """One model replica; each call embeds whole chunks into the cache."""

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
        self.compute = str(self.embedder.compute)

    def __call__(self, batch: dict) -> dict:
        """A Ray Data batch of ``need`` / ``cache`` paths -> ``rows`` embedded per chunk, with the worker's node,
        compute path and peak RSS so far (:meth:`report`'s, as columns)."""
        import numpy as np

        rows = np.array(self.embed_into(self.store, batch["need"], batch["cache"]), dtype=np.int64)
        done = self.report(0)
        return {
            "rows": rows,
            "node": np.array([done.nodes[0]] * len(rows)),
            "compute": np.array([self.compute] * len(rows)),
            "rss_mib": np.full(len(rows), done.peak_rss_mib),
        }

    def report(self, rows: int) -> Embedded:
        """``rows`` embedded here: this node, this worker's compute path and its peak RSS so far."""
        return Embedded(rows, (node_id(),), (self.compute,), round(peak_rss_mib(), 1))

    def embed_into(self, store: Store, needs, caches) -> list[int]:
        """Embed each ``need`` file's texts into its ``cache`` file of ``store``; returns rows per chunk."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        done = []
        for need, cache in zip(needs, caches, strict=True):
            chunk = store.read_table(str(need))
            vectors = self.embedder.embed_documents(chunk.column("text").to_pylist())
            table = pa.table(
                {"content_hash": chunk.column("content_hash"), "vector": to_arrow(vectors, vectors.shape[1])}
            )
            tmp = local_tmpdir("embray-embed-")
            pq.write_table(with_fingerprint(table, self.fp), str(tmp / "chunk.parquet"))
            store.upload(str(tmp / "chunk.parquet"), str(cache))  # whole or not at all: a rerun trusts it
            tmp.rmdir()
            done.append(chunk.num_rows)
        return done
