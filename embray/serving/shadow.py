"""Shadow traffic (``serve.shadow``): a share of live text queries, once answered by the active version, asked
again of the `candidate` on a thread of its own; the overlap@10 and the latency are recorded per candidate
(:class:`embray.quality.shadow.ShadowRecorder`, Prometheus gauges, and ``_status/shadow/`` for the promotion
gate). The callers never wait for it: at most ``serve.shadow.max_pending`` queries wait, further ones are
dropped and counted."""

from __future__ import annotations

import logging
import os
import queue
import random
import socket
import threading
from collections.abc import Callable

from embray.config import ShadowConfig
from embray.quality.shadow import ShadowRecorder, overlap_at_10
from embray.serving.metrics import ServeMetrics, ShadowMetrics
from embray.storage.store import Store

log = logging.getLogger("embray.serve")

# ask(text, k, where): the candidate's version, its top-k ids for text (under the same filter: where) and the
# milliseconds its search took, or None when there is no candidate (or it is the version that answered); it may
# raise (logged once per distinct error).
Ask = Callable[[str, int, "dict | None"], "tuple[str, list, float] | None"]


class ShadowSender:
    def __init__(self, sc: ShadowConfig, metrics: ServeMetrics, ask: Ask, stop: threading.Event):
        self.fraction = sc.fraction
        self.recorder = ShadowRecorder()
        self._metrics = ShadowMetrics(metrics)
        self._queue: queue.Queue = queue.Queue(maxsize=sc.max_pending)
        self._ask, self._stop = ask, stop
        self.replica = f"{socket.gethostname()}-{os.getpid()}"
        threading.Thread(target=self._loop, name="embray-shadow", daemon=True).start()

    def offer(self, text: str, ids: list, where: dict | None = None) -> None:
        """After an active text answer: maybe queue it for the candidate, with its filter (never waits; dropped
        when full)."""
        if len(ids) < 10 or random.random() >= self.fraction:
            return  # (a query for fewer than 10 hits says nothing about overlap@10)
        if where:  # the query as the user asked it, but its fields (the overlap compares ids only)
            where = {key: v for key, v in where.items() if key != "fields" and v is not None} or None
        try:
            self._queue.put_nowait((text, ids[:10], where))
        except queue.Full:
            self._metrics.drop()

    def write(self, store: Store, collection: str) -> None:
        """This replica's numbers into the store, where `embray status` and the promotion gate add them up."""
        try:
            self.recorder.write(store, collection, self.replica)
        except Exception as e:  # noqa: BLE001 - written again at the next poll
            log.warning("cannot write the shadow-traffic numbers: %s", e)

    def _loop(self) -> None:
        last: str | None = None
        while not self._stop.is_set():
            try:
                text, ids, where = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            try:
                self._one(text, ids, where)
                last = None
            except Exception as e:  # noqa: BLE001 - shadow traffic must never hurt serving
                if str(e) != last:  # once per distinct error, not once per query
                    log.warning("shadow query to the candidate failed: %s", e)
                last = str(e)

    def _one(self, text: str, ids: list, where: dict | None = None) -> None:
        got = self._ask(text, len(ids), where)
        if got is None:
            return
        version, cand_ids, ms = got
        self.recorder.add(version, overlap_at_10(ids, cand_ids), ms)
        self._metrics.record(version, self.recorder.mean_overlap(version), ms)
