"""The ingress's side of shard groups (``serve.shard_groups`` = G > 1): ask every group for its top k of the
version a query is answered from, concurrently through deployment handles, and merge by score, then id. A
group that fails or does not answer within ``serve.group_timeout_s`` fails the request with a 503 naming it,
unless the request accepts a ``partial`` answer (then its shards are listed as missing)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import HTTPException

from embray.config import ServeConfig
from embray.errors import one_line
from embray.results import Hit
from embray.search import VersionIndex, group_shards, merge_hits
from embray.serving.groups import group_deployment

log = logging.getLogger("embray.serve")


class FanOut:
    def __init__(self, handles: list, s: ServeConfig):
        self.handles = handles  # of EmbrayShardGroup0..G-1
        self.timeout_s, self.switch_timeout_s = s.group_timeout_s, s.switch_timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None  # the replica's, set by each request

    async def search(
        self, idx: VersionIndex, q, k: int, partial: bool, chunks: bool = False, where: dict | None = None
    ) -> tuple[list[list[Hit]], list[int]]:
        """Every group's top k of ``idx``'s version for each query row of ``q``, merged; and the missing shards.
        A chunked version's documents never span groups (a document's passages are all in its shard), so the
        groups' best documents merge by score as rows do. ``where`` (``filter``, ``fields``; ``mode`` keyword with
        the query ``texts`` instead of ``q``) goes to every group: each filters its own shards' rows, and keyword
        answers merge by BM25 score."""
        G, limit = len(self.handles), self.timeout_s

        async def ask(g: int, handle):
            response = handle.search.remote((g, G), idx.version, q, k, chunks, where)
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()
                raise

        tasks = [asyncio.ensure_future(ask(g, h)) for g, h in enumerate(self.handles)]
        try:
            _, pending = await asyncio.wait(tasks, timeout=limit)
        finally:  # (also when the caller went away: the groups' work is cancelled with it)
            for task in tasks:
                if not task.done():
                    task.cancel()
        answers: dict[int, list[list[Hit]]] = {}
        failed: dict[int, str] = {}
        for g, task in enumerate(tasks):
            if task in pending:
                failed[g] = f"no answer within {limit:g}s (serve.group_timeout_s)"
            elif task.exception() is not None:
                failed[g] = one_line(task.exception())
            else:
                answers[g] = task.result()
        return self._merge(idx, answers, failed, k, partial)

    def prepare(self, version: str) -> None:
        """From a thread off the event loop: have each shard group load ``version`` (one replica of each).
        Best effort: a group that cannot is named by the queries' fan-out (503, or missing in a partial answer)."""

        async def prepare_all():
            return await asyncio.gather(*(h.prepare.remote(version) for h in self.handles), return_exceptions=True)

        try:
            got = self.on_loop(prepare_all(), self.switch_timeout_s)
        except Exception as e:  # noqa: BLE001 - the timeout: the groups go on loading
            got = [e]
        for g, e in enumerate(got):
            if isinstance(e, BaseException):
                log.warning("shard group %s could not load %s: %s", g, version, one_line(e))

    def on_loop(self, coro, timeout_s: float):
        """Run ``coro`` on the replica's event loop from a thread off it (shadow traffic, pinned loads): handles
        made with RAY_SERVE_THROUGHPUT_OPTIMIZED work only there."""
        if self.loop is None:  # no request yet: nothing to run it on
            coro.close()
            raise RuntimeError("no request has reached this replica yet")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def _merge(self, idx: VersionIndex, answers: dict, failed: dict[int, str], k: int, partial: bool):
        groups = len(self.handles)
        if failed and (not partial or not answers):
            what = "; ".join(f"shard group {g} of {groups} ({group_deployment(g)}): {why}" for g, why in failed.items())
            hint = "" if partial else '; ask again, or send "partial": true to accept the other groups\' answers'
            raise HTTPException(503, f"no complete answer from version {idx.version}: {what}{hint}")
        shards = idx.manifest.shards
        missing = sorted(s for g in failed for s in group_shards(len(shards), g, groups) if shards[s].rows)
        rows = len(next(iter(answers.values())))
        return [merge_hits([a[r] for a in answers.values()], k) for r in range(rows)], missing
