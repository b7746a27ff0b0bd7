"""The Ray Serve application: answers queries from the collection's `active` version (or, for a query that
pins one with ``{"version": ...}``, from that committed version), and every answer from one version.

One deployment, ``EmbrayServer``, with a FastAPI ingress. Each replica holds one loaded version: its
query encoder (the version's own model, checked against the version's fingerprint) and its USearch
shards, memory-mapped. A background thread polls MLflow alias ``active`` every ``serve.poll_s``
seconds (``POST /v1/collections/{name}/reload`` checks at once on the replica it reaches, and writes a
marker that the other replicas look for every second); on a change the replica loads and
warms the new version beside the old one, then swaps one reference. A request reads that reference
once, so it is answered wholly from one version; the old version is released when the last request
holding it finishes. A pinned query's version is loaded on demand beside the active one and kept among
the ``serve.max_loaded_versions`` (least recently used unloaded first).

With ``serve.shard_groups`` = G > 1 a version is spread over G more deployments (embray.serving.groups): each
EmbrayServer replica then holds only the encoder, embeds a text query once, asks every group for its top k of
the version it names (concurrently, through deployment handles) and merges them by score, then id. It
switches to a new version only once every group replica has it loaded (two-phase), and a group that fails
or times out fails the request with a 503 that names it, unless the request accepts a ``partial`` answer.
"""

# No `from __future__ import annotations` here: FastAPI must see the real types of the route parameters.
import asyncio
import json
import logging
import math
import threading
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from ray import serve

from embray.collection import Collection
from embray.config import Config
from embray.errors import EmbrayError, QueryError, VersionError
from embray.lifecycle.registry import CANDIDATE
from embray.lifecycle.versions import utcnow
from embray.search import KEYWORD, VECTOR, fuse_hits, hybrid_depth
from embray.serving.auth import API_KEY, BEARER, check_admin, check_query
from embray.serving.fanout import FanOut
from embray.serving.groups import serve_config
from embray.serving.metrics import ServeMetrics
from embray.serving.schemas import CollectionInfo, NotReady, SearchRequest, SearchResponse, errors
from embray.serving.shadow import ShadowSender
from embray.serving.switching import Loaded, ServedVersions
from embray.serving.watch import poll_loop
from embray.storage.layout import reload_file

log = logging.getLogger("embray.serve")

app = FastAPI(
    title="embray",
    description="Search a managed embedding collection. Every answer comes from the collection's active version "
    "and names that version and its fingerprint.",
    version="1",
)


@serve.deployment(name="EmbrayServer", max_ongoing_requests=32, max_queued_requests=64)
@serve.ingress(app)
class EmbrayServer:
    def __init__(self, config: dict[str, Any], groups: list | None = None):
        self.cfg: Config = serve_config(config)  # a short MLflow budget: serving goes on while it is down
        self.fan_out = FanOut(list(groups), self.cfg.serve) if groups else None  # shard_groups > 1
        self.collection = Collection(self.cfg)
        self.store = self.collection.store
        mon = self.cfg.monitor
        self.metrics = ServeMetrics(
            self.cfg.collection, stale_threshold=mon.max_stale_fraction, monitor_interval_s=mon.interval_s
        )
        n_groups = len(self.fan_out.handles) if self.fan_out else 0
        prepare = self.fan_out.prepare if self.fan_out else None
        self.versions = ServedVersions(self.collection, self.metrics, n_groups, prepare)
        self.versions.check()  # serve at once if there is an active version (with shard groups: once they hold it)
        self._stop = threading.Event()
        sc = self.cfg.serve.shadow
        self.shadow = ShadowSender(sc, self.metrics, self._ask_candidate, self._stop) if sc.fraction > 0 else None
        check = self.versions.check
        args = (self._stop, self.store, self.cfg.collection, self.cfg.serve.poll_s, check, self._every_poll)
        threading.Thread(target=poll_loop, args=args, name="embray-alias-poller", daemon=True).start()
        threading.Thread(target=self._keep_gauges, name="embray-gauges", daemon=True).start()

    def _ask_candidate(self, text: str, k: int, where: dict | None = None) -> "tuple[str, list, float] | None":
        """Shadow traffic: the candidate's answer to ``text`` under the same filter (``where``; None: no
        candidate, or it is the active one)."""
        cur = self.versions.current
        try:
            cand = self.versions.pinned_version(CANDIDATE, may_block=True)  # alias read at most every poll_s
        except HTTPException as e:
            if e.status_code == 404:  # no candidate now
                return None
            raise
        if cand is None or (cur is not None and cand.version == cur.version):
            return None
        t = time.perf_counter()
        where = dict(where or {})
        mode, weights = where.pop("mode", VECTOR), where.pop("weights", None)
        if self.fan_out is None:
            got = cand.index.search_text([text], k, mode=mode, weights=weights, **where)[0]
        else:  # on the replica's event loop (handles made with RAY_SERVE_THROUGHPUT_OPTIMIZED work only there)
            q = cand.index.embedder.embed_queries([text]) if mode != KEYWORD else None
            asked = self._search(cand.index, q, [text], k, False, mode, weights, where, False)
            got = self.fan_out.on_loop(asked, self.fan_out.timeout_s + 1)[0][0]
        return cand.version, [h.id for h in got], (time.perf_counter() - t) * 1000

    def _every_poll(self) -> None:
        """After each scheduled alias check: write the shadow numbers and export the monitor's status."""
        if self.shadow is not None:
            self.shadow.write(self.store, self.cfg.collection)
        st = self.collection.last_status()
        if st:
            self.metrics.status(st)

    def _keep_gauges(self) -> None:
        """Ray drops a gauge ~20-30 s after its last set: keep every state gauge set, every second, on a
        thread of its own (an alias check may wait on MLflow meanwhile)."""
        while not self._stop.wait(1.0):
            try:
                self.metrics.refresh()
            except Exception as e:  # noqa: BLE001 - the next tick tries again
                log.warning("cannot refresh the metrics: %s", e)

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def _collection(self, name: str) -> None:
        if name != self.cfg.collection:
            raise HTTPException(404, f"unknown collection {name!r}; this server has {self.cfg.collection!r}")

    # --- endpoints -----------------------------------------------------------------------
    # The request path is tuned for latency (bench/serve.py): the light endpoints are `async def`, so they
    # run on the replica's event loop instead of hopping to FastAPI's thread pool (about 1 ms a request
    # here); search answers with pre-serialised JSON rather than a validated response model.
    @app.get("/healthz", summary="The process is alive.")
    async def healthz(self) -> dict:
        return {"ok": True}

    @app.get("/readyz", summary="A version is loaded and warm.", responses={503: {"model": NotReady}})
    async def readyz(self):
        code, doc = await self.readiness()
        return doc if code == 200 else JSONResponse(doc, status_code=code)

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        """(200 or 503, the /readyz body); also called through a deployment handle by the embray-readyz
        application (embray.serving.readiness), which answers /readyz while no replica of this one runs."""
        v = self.versions
        cur = v.current
        mlflow = v.mlflow_state()  # an MLflow outage is reported, not a reason to be unready
        if cur is None:
            why = v.last_error or (f"MLflow unreachable: {mlflow['error']}" if not mlflow["ok"] else None)
            return 503, {"ready": False, "reason": why or "no active version yet", "mlflow": mlflow}
        doc = {"ready": True, "version": cur.version, "mlflow": mlflow}
        if self.fan_out is not None:
            doc["shard_groups"] = len(self.fan_out.handles)
        return 200, doc

    @app.get(
        "/v1/collections/{name}",
        response_model=CollectionInfo,
        summary="What this server serves.",
        responses=errors(401, 404, 500),
    )
    def info(
        self,
        name: str,
        bearer: HTTPAuthorizationCredentials | None = BEARER,
        x_api_key: str | None = API_KEY,
    ):
        self._collection(name)
        check_query(self.cfg.serve, bearer, x_api_key)
        v = self.versions
        cur = v.current
        m = cur.index.manifest if cur else None
        return CollectionInfo(
            collection=name,
            version=cur.version if cur else None,
            fingerprint=m.fingerprint if m else None,
            model=m.model.label if m else None,
            rows=m.rows if m else None,
            dims=m.dims if m else None,
            loaded_at=cur.loaded_at if cur else None,
            load_seconds=round(cur.load_seconds, 3) if cur else None,
            last_check=v.last_check,
            last_error=v.last_error,
            pinned=v.pinned.ids(),
            shard_groups=len(self.fan_out.handles) if self.fan_out else 1,
        )

    @app.post(
        "/v1/collections/{name}/search",
        response_model=SearchResponse,
        summary="Top-k search.",
        responses=errors(401, 404, 409, 413, 422, 500, 503),
    )
    async def search(
        self,
        name: str,
        body: SearchRequest,
        bearer: HTTPAuthorizationCredentials | None = BEARER,
        x_api_key: str | None = API_KEY,
    ):
        # Inline on the event loop, not in a thread: a replica has one CPU, so queries run one at a time
        # either way, and a thread hop costs about 1 ms (bench/serve.py). Version loads stay off the loop.
        t = time.perf_counter()
        if self.fan_out is not None:
            self.fan_out.loop = asyncio.get_running_loop()  # for fan-outs from threads (shadow, pinned loads)
        endpoint = "batch" if body.queries is not None else "text" if body.text is not None else "vector"
        version = None
        try:
            self._collection(name)
            check_query(self.cfg.serve, bearer, x_api_key)
            pinned = None
            if body.version is not None:
                pinned = self.versions.pinned_version(body.version, may_block=False)
                if pinned is None:  # an alias to read or a version to load: off the event loop
                    pinned = await asyncio.to_thread(self.versions.pinned_version, body.version, may_block=True)
            cur = pinned or self.versions.serving()  # read once: the whole answer comes from this version
            version = cur.version
            doc, missing = await self._answer(cur, body, shadow=pinned is None)
            ms = (time.perf_counter() - t) * 1000
            self.metrics.record(endpoint, version, "partial" if missing else "ok", ms)
            self.metrics.searched(body.mode, body.filter is not None)
            doc["took_ms"] = round(ms, 3)
            return Response(json.dumps(doc, separators=(",", ":")), media_type="application/json")
        except HTTPException as e:
            self.metrics.record(endpoint, version, str(e.status_code), (time.perf_counter() - t) * 1000)
            raise
        except QueryError as e:  # a filter or fields this version cannot answer
            self.metrics.record(endpoint, version, "422", (time.perf_counter() - t) * 1000)
            raise HTTPException(422, str(e)) from e
        except VersionError as e:
            self.metrics.record(endpoint, version, "error", (time.perf_counter() - t) * 1000)
            raise HTTPException(500, str(e)) from e

    async def _answer(self, cur: Loaded, body: SearchRequest, *, shadow: bool) -> tuple[dict[str, Any], list]:
        """The SearchResponse body (the route's documented response_model, serialised directly) from ``cur``,
        but for took_ms; and the shards missing from a partial answer. A batch's texts are embedded in one
        call and its queries searched together."""
        idx = cur.index
        batch = body.queries is not None
        queries = body.queries if batch else [body]
        if batch and len(queries) > self.cfg.serve.max_batch:
            raise HTTPException(
                413, f"a batch of {len(queries)} queries; the limit is {self.cfg.serve.max_batch} (serve.max_batch)"
            )
        where = {"filter": body.filter, "fields": body.fields}
        idx.check_query(**where)  # QueryError (422) before any embedding
        idx.check_mode(body.mode)
        weights = body.weights.model_dump() if body.weights is not None else None
        texts = [q.text for q in queries]
        if body.mode != VECTOR and None in texts:
            where_ = f"queries[{texts.index(None)}]: " if batch else ""
            raise HTTPException(422, f"{where_}mode {body.mode} searches by text, not vectors")
        q = self._vectors(idx, queries, batch) if body.mode != KEYWORD else None
        found, missing = await self._search(idx, q, texts, body.k, body.chunks, body.mode, weights, where, body.partial)
        if not batch and body.text is not None and shadow and self.shadow is not None:
            self.shadow.offer(body.text, [h.id for h in found[0]], {**where, "mode": body.mode, "weights": weights})
        results = [[h.to_dict() for h in hits] for hits in found]
        doc: dict[str, Any] = {
            "version": idx.version,
            "fingerprint": idx.fingerprint,
            "results": results if batch else results[0],
        }
        if missing:
            doc.update(partial=True, missing_shards=missing)
        return doc, missing or []

    async def _search(self, idx, q, texts, k: int, chunks: bool, mode: str, weights, where: dict, partial: bool):
        """Each query's hits by ``mode`` (vectors ``q``, ``texts``), from this replica's shards or the shard
        groups' (hybrid: each side's answer merged over the groups, then fused); and the shards missing."""
        if self.fan_out is None:
            if mode == VECTOR:
                return idx.search_vectors(q, k, chunks=chunks, **where), []
            if mode == KEYWORD:
                return idx.search_keywords(texts, k, chunks=chunks, **where), []
            depth = hybrid_depth(k)
            vec = idx.search_vectors(q, depth, chunks=chunks, **where)
            kw = idx.search_keywords(texts, depth, chunks=chunks, **where)
            return [fuse_hits(v, w, k, weights, chunks) for v, w in zip(vec, kw, strict=True)], []
        fan = self.fan_out
        if mode == VECTOR:
            return await fan.search(idx, q, k, partial, chunks, where)
        by_words = {**where, "mode": KEYWORD, "texts": texts}
        if mode == KEYWORD:
            return await fan.search(idx, None, k, partial, chunks, by_words)
        depth = hybrid_depth(k)
        (vec, m1), (kw, m2) = await asyncio.gather(
            fan.search(idx, q, depth, partial, chunks, where), fan.search(idx, None, depth, partial, chunks, by_words)
        )
        return [fuse_hits(v, w, k, weights, chunks) for v, w in zip(vec, kw, strict=True)], sorted(set(m1) | set(m2))

    def _vectors(self, idx, queries: list, batch: bool):
        """The query vectors, in order: texts embedded by the version's model (in one call), vectors checked."""
        import numpy as np

        where = (lambda i: f"queries[{i}]: ") if batch else (lambda i: "")
        limit = self.cfg.serve.max_text_chars
        texts = [(i, q.text) for i, q in enumerate(queries) if q.text is not None]
        for i, text in texts:
            if len(text) > limit:
                raise HTTPException(
                    413, f"{where(i)}text has {len(text)} characters; the limit is {limit} (serve.max_text_chars)"
                )
        out = np.zeros((len(queries), idx.manifest.dims), dtype=np.float32)
        for i, q in enumerate(queries):
            if q.vector is None:
                continue
            if q.fingerprint != idx.fingerprint:
                raise HTTPException(
                    409,
                    f"{where(i)}the vector was made in space {q.fingerprint}, but this server answers from version "
                    f"{idx.version} in space {idx.fingerprint}; embed the query with that version's model, or send "
                    "`text`",
                )
            if len(q.vector) != idx.manifest.dims:
                raise HTTPException(
                    422,
                    f"{where(i)}vector has {len(q.vector)} dimensions; version {idx.version} has {idx.manifest.dims}",
                )
            if not all(math.isfinite(x) for x in q.vector):
                raise HTTPException(422, f"{where(i)}vector has NaN or infinite values")
            out[i] = q.vector
        if texts:
            out[[i for i, _ in texts]] = idx.embedder.embed_queries([t for _, t in texts])
        return out

    @app.post(
        "/v1/collections/{name}/reload",
        summary="Check the `active` alias now (admin token).",
        responses=errors(401, 403, 404, 500),
    )
    def reload(self, name: str, bearer: HTTPAuthorizationCredentials | None = BEARER):
        self._collection(name)
        check_admin(self.cfg.serve, bearer)
        # The marker tells the other replicas (each polls it every second) to check too.
        try:
            self.store.write_bytes(reload_file(self.cfg.collection), json.dumps({"at": utcnow()}).encode())
        except EmbrayError as e:  # read-only store credentials: this replica still checks; the rest on their poll
            log.warning("reload marker not written (%s): other replicas switch on their next poll", e)
        switched = self.versions.check()
        cur = self.versions.current
        return {"version": cur.version if cur else None, "switched": switched, "error": self.versions.last_error}


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):  # the server answers, whatever the input
    log.exception("unexpected error on %s: %s", request.url.path, exc)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)
