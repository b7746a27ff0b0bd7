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
import hmac
import json
import logging
import math
import os
import queue
import random
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from embray.collection import Collection
from embray.config import Config, load_config
from embray.errors import ConfigError, EmbrayError, VersionError, one_line
from embray.lifecycle.registry import ACTIVE, CANDIDATE
from embray.lifecycle.versions import is_version_id, read_manifest, utcnow
from embray.quality.shadow import ShadowRecorder, overlap_at_10
from embray.results import Hit
from embray.search import VersionIndex, group_shards, merge_hits
from embray.serving.groups import EmbrayShardGroup, Liveness, group_deployment, not_ready, serve_config
from embray.serving.metrics import ServeMetrics, ShadowMetrics
from embray.serving.schemas import CollectionInfo, NotReady, SearchRequest, SearchResponse, errors
from embray.serving.watch import poll_loop
from embray.storage.layout import reload_file

log = logging.getLogger("embray.serve")

WARMUP_QUERY = "embray warm-up query"


@dataclass
class Loaded:
    """One version, loaded and warmed; immutable once published."""

    index: VersionIndex
    loaded_at: str
    load_seconds: float

    @property
    def version(self) -> str:
        return self.index.version


def _secret(configured: str | None, env: str) -> str | None:
    return configured or os.environ.get(env) or None


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


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
        self.groups = list(groups) if groups else None  # handles of EmbrayShardGroup0..G-1 (shard_groups > 1)
        self.collection = Collection(self.cfg)
        self.store = self.collection.store
        self.current: Loaded | None = None
        self.last_check: str | None = None
        self.last_error: str | None = None
        self.mlflow_down: tuple[str, str] | None = None  # (since, error) while the alias cannot be read
        self._switch = threading.Lock()
        self.pinned: OrderedDict[str, Loaded] = OrderedDict()  # versions queries named, least recently used first
        self._pins = threading.Lock()  # guards self.pinned and self._aliases
        self._pin_load = threading.Lock()  # one pinned load at a time
        self._aliases: dict[str, tuple[str | None, float]] = {}  # alias -> (version, when read)
        mon = self.cfg.monitor
        self.metrics = ServeMetrics(
            self.cfg.collection, stale_threshold=mon.max_stale_fraction, monitor_interval_s=mon.interval_s
        )
        self._liveness = Liveness()  # shard groups' status files, judged by this replica's clock
        self.check()  # serve at once if there is an active version (with shard groups: once they hold it too)
        self._stop = threading.Event()
        self._start_shadow()
        args = (self._stop, self.store, self.cfg.collection, self.cfg.serve.poll_s, self.check, self._every_poll)
        self._poller = threading.Thread(target=poll_loop, args=args, name="embray-alias-poller", daemon=True)
        self._poller.start()
        threading.Thread(target=self._keep_gauges, name="embray-gauges", daemon=True).start()

    # --- version switching ---------------------------------------------------------------
    def _active_alias(self) -> str | None:
        return self.collection.aliases().get(ACTIVE)

    def check(self) -> bool:
        """Load the version `active` points at, if it is not the one served. True when it switched."""
        with self._switch:  # one load at a time; requests never wait on this
            self.last_check = utcnow()
            try:
                target = self._active_alias()
            except EmbrayError as e:  # MLflow is down: keep serving what is loaded, and say so
                if self.mlflow_down is None:
                    self.mlflow_down = (utcnow(), str(e))
                    log.warning("cannot read the active alias (still serving %s): %s", self._served_name(), e)
                self.metrics.mlflow(False)
                return False
            if self.mlflow_down is not None:
                log.info("MLflow is back (unreachable since %s)", self.mlflow_down[0])
                self.mlflow_down = None
            self.metrics.mlflow(True)
            try:
                if target is None or (self.current is not None and self.current.version == target):
                    self.last_error = None
                    self.metrics.alias(target is not None)
                    return False
                t = time.monotonic()
                index = self._open(target)
                if self.groups is not None:
                    self._await_groups(target)  # the two-phase switch: every group replica has it first
                loaded = Loaded(index, utcnow(), time.monotonic() - t)
            except EmbrayError as e:  # read the alias but could not load its version
                self.last_error = str(e)
                self.metrics.alias(False)
                log.error("could not switch to the active version: %s (still serving %s)", e, self._served_name())
                return False
            old = self.current.version if self.current else None
            self.current = loaded  # the switch: one reference; in-flight requests keep the one they read
            self.last_error = None
            self.metrics.served(old, loaded.version, loaded.load_seconds, index.manifest.rows, index.manifest.created)
            self.metrics.alias(True)
            log.info("serving %s (was %s); loaded and warmed in %.2fs", loaded.version, old, loaded.load_seconds)
            return True

    def _open(self, version: str) -> VersionIndex:
        """Open and warm ``version``: its encoder and shards, or with shard groups the encoder only."""
        if self.groups is None:
            index = self.collection.index(version)
            index.search_text([WARMUP_QUERY], k=1)  # loads the encoder and touches every shard
            return index
        manifest = read_manifest(self.store, self.cfg.collection, version)
        shared = self.current.index if self.current else None
        index = VersionIndex(self.store, manifest, encoder_only=True, shared=shared)
        index.embedder.embed_queries([WARMUP_QUERY])
        return index

    def _await_groups(self, version: str) -> None:
        """Wait until every live replica of every shard group reports ``version`` loaded and warm."""
        deadline = time.monotonic() + self.cfg.serve.switch_timeout_s
        while True:
            why = not_ready(self.store, self.cfg.collection, len(self.groups or ()), version, self._liveness)
            if not why:
                return
            if time.monotonic() > deadline:
                raise EmbrayError(
                    f"not switching to {version}: after {self.cfg.serve.switch_timeout_s:.0f}s "
                    f"(serve.switch_timeout_s) {'; '.join(why)}; tried again at the next check"
                )
            time.sleep(0.25)

    def _served_name(self) -> str:
        return self.current.version if self.current else "nothing"

    def _mlflow_state(self) -> dict[str, Any]:
        down = self.mlflow_down
        return {"ok": True} if down is None else {"ok": False, "since": down[0], "error": down[1]}

    # --- shadow traffic to the candidate (serve.shadow) -------------------------------------------
    def _start_shadow(self) -> None:
        self.shadow: ShadowRecorder | None = None
        sc = self.cfg.serve.shadow
        if sc.fraction <= 0:
            return
        self.shadow = ShadowRecorder()
        self._shadow_metrics = ShadowMetrics(self.metrics)
        self._shadow_q: queue.Queue = queue.Queue(maxsize=sc.max_pending)
        self._replica = f"{socket.gethostname()}-{os.getpid()}"
        threading.Thread(target=self._shadow_loop, name="embray-shadow", daemon=True).start()

    def _shadow_offer(self, text: str, ids: list) -> None:
        """After an active text answer: maybe queue it for the candidate (never waits; dropped when full)."""
        if self.shadow is None or len(ids) < 10 or random.random() >= self.cfg.serve.shadow.fraction:
            return  # (a query for fewer than 10 hits says nothing about overlap@10)
        try:
            self._shadow_q.put_nowait((text, ids[:10]))
        except queue.Full:
            self._shadow_metrics.drop()

    def _shadow_loop(self) -> None:
        last: str | None = None
        while not self._stop.is_set():
            try:
                text, ids = self._shadow_q.get(timeout=1.0)
            except queue.Empty:
                continue
            try:
                self._shadow_one(text, ids)
                last = None
            except Exception as e:  # noqa: BLE001 - shadow traffic must never hurt serving
                if str(e) != last:  # once per distinct error, not once per query
                    log.warning("shadow query to the candidate failed: %s", e)
                last = str(e)

    def _shadow_one(self, text: str, ids: list) -> None:
        cur = self.current
        try:
            cand = self._pinned(CANDIDATE, may_block=True)  # alias read at most every poll_s; loaded once (LRU)
        except HTTPException as e:
            if e.status_code == 404:  # no candidate now
                return
            raise
        if cand is None or not ids or (cur is not None and cand.version == cur.version):
            return
        t = time.perf_counter()
        if self.groups is None:
            got = cand.index.search_text([text], len(ids))[0]
        else:
            got = self._fan_out_blocking(cand.index, cand.index.embedder.embed_queries([text]), len(ids))
        ms = (time.perf_counter() - t) * 1000
        self.shadow.add(cand.version, overlap_at_10(ids, [h.id for h in got]), ms)  # type: ignore[union-attr]
        self._shadow_metrics.record(cand.version, self.shadow.mean_overlap(cand.version), ms)  # type: ignore[union-attr]

    # --- pinned versions ({"version": ...} in a query) ----------------------------------------
    def _pinned(self, requested: str, *, may_block: bool) -> "Loaded | None":
        """The loaded version a query pinned (an id or an alias). Without ``may_block``, None where that would
        need an MLflow read or a load; with it, loads the version (evicting the least recently used)."""
        cur = self.current
        if requested == ACTIVE:
            return self._serving()
        vid = requested
        if not is_version_id(requested):
            with self._pins:
                hit = self._aliases.get(requested)
            if hit is None or time.monotonic() - hit[1] >= self.cfg.serve.poll_s:
                if not may_block:
                    return None
                hit = self._read_alias(requested)
            if hit[0] is None:
                raise HTTPException(
                    404,
                    f"{requested!r} is neither a version id nor an alias of {self.cfg.collection!r}; "
                    "`embray versions` lists both",
                )
            vid = hit[0]
        if cur is not None and vid == cur.version:
            return cur
        with self._pins:
            got = self.pinned.get(vid)
            if got is not None:
                self.pinned.move_to_end(vid)
                return got
        return self._load_pinned(vid) if may_block else None

    def _read_alias(self, name: str) -> tuple[str | None, float]:
        try:
            hit = (self.collection.aliases().get(name), time.monotonic())
        except EmbrayError as e:
            raise HTTPException(503, f"cannot read alias {name!r} from MLflow: {e}") from e
        with self._pins:
            self._aliases[name] = hit
        return hit

    def _load_pinned(self, vid: str) -> Loaded:
        with self._pin_load:
            with self._pins:
                got = self.pinned.get(vid)
            if got is not None:
                return got
            t = time.monotonic()
            try:
                manifest = read_manifest(self.store, self.cfg.collection, vid)
            except VersionError as e:  # never committed, or collected
                raise HTTPException(404, str(e)) from e
            except EmbrayError as e:
                raise HTTPException(503, f"could not read version {vid}: {e}") from e
            try:  # opened here, not through the Collection's own cache: only self.pinned keeps it loaded
                shared = self.current.index if self.current else None
                index = VersionIndex(self.store, manifest, shared=shared, encoder_only=self.groups is not None)
                index.search_text([WARMUP_QUERY], k=1)
                if self.groups is not None:  # one replica of each group loads its part now, the others on use
                    self._prepare_groups(vid)
            except FileNotFoundError as e:
                raise HTTPException(404, f"version {vid} was collected while it loaded: {e}") from e
            except EmbrayError as e:
                raise HTTPException(503, f"could not load version {vid}: {e}") from e
            loaded = Loaded(index, utcnow(), time.monotonic() - t)
            log.info("loaded %s for pinned queries in %.2fs", vid, loaded.load_seconds)
            with self._pins:
                self.pinned[vid] = loaded
                while len(self.pinned) > self.cfg.serve.max_loaded_versions - 1:
                    old, _ = self.pinned.popitem(last=False)  # requests holding it finish with it
                    log.info("unloaded pinned version %s (serve.max_loaded_versions)", old)
            return loaded

    def _every_poll(self) -> None:
        """After each scheduled alias check: write the shadow numbers and export the monitor's status."""
        if self.shadow is not None:
            try:
                self.shadow.write(self.store, self.cfg.collection, self._replica)
            except Exception as e:  # noqa: BLE001 - written again at the next poll
                log.warning("cannot write the shadow-traffic numbers: %s", e)
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

    # --- helpers -------------------------------------------------------------------------
    def _collection(self, name: str) -> None:
        if name != self.cfg.collection:
            raise HTTPException(404, f"unknown collection {name!r}; this server has {self.cfg.collection!r}")

    def _serving(self) -> Loaded:
        cur = self.current
        if cur is None:
            why = self.last_error or "no active alias"
            raise HTTPException(503, f"no version of {self.cfg.collection!r} is loaded yet: {why}")
        return cur

    def _auth_query(self, authorization: str | None, api_key: str | None) -> None:
        want = _secret(self.cfg.serve.api_key, "EMBRAY_API_KEY")
        if want is None:
            return
        got = api_key or _bearer(authorization)
        if got is None or not hmac.compare_digest(got, want):
            raise HTTPException(401, "an API key is required: send it as the X-API-Key header")

    # --- endpoints -----------------------------------------------------------------------
    # The request path is tuned for latency (bench/serve.py): the light endpoints are `async def`, so they
    # run on the replica's event loop instead of hopping to FastAPI's thread pool (about 1 ms a request
    # here); search answers with pre-serialised JSON rather than a validated response model.
    @app.get("/healthz", summary="The process is alive.")
    async def healthz(self) -> dict:
        return {"ok": True}

    @app.get("/readyz", summary="A version is loaded and warm.", responses={503: {"model": NotReady}})
    async def readyz(self):
        cur = self.current
        mlflow = self._mlflow_state()  # an MLflow outage is reported, not a reason to be unready
        if cur is None:
            why = self.last_error or (f"MLflow unreachable: {mlflow['error']}" if not mlflow["ok"] else None)
            return JSONResponse(
                {"ready": False, "reason": why or "no active version yet", "mlflow": mlflow}, status_code=503
            )
        doc = {"ready": True, "version": cur.version, "mlflow": mlflow}
        if self.groups is not None:
            doc["shard_groups"] = len(self.groups)
        return doc

    @app.get(
        "/v1/collections/{name}",
        response_model=CollectionInfo,
        summary="What this server serves.",
        responses=errors(401, 404, 500),
    )
    def info(self, name: str, authorization: str | None = Header(None), x_api_key: str | None = Header(None)):
        self._collection(name)
        self._auth_query(authorization, x_api_key)
        cur = self.current
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
            last_check=self.last_check,
            last_error=self.last_error,
            pinned=list(self.pinned),
            shard_groups=len(self.groups or ()) or 1,
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
        authorization: str | None = Header(None),
        x_api_key: str | None = Header(None),
    ):
        # Inline on the event loop, not in a thread: a replica has one CPU, so queries run one at a time
        # either way, and a thread hop costs about 1 ms (bench/serve.py). Version loads stay off the loop.
        t = time.perf_counter()
        self._loop = asyncio.get_running_loop()  # for the shadow thread's fan-out (shard groups)
        pinned = None
        if body.version is not None:
            try:
                self._collection(name)
                self._auth_query(authorization, x_api_key)
                pinned = self._pinned(body.version, may_block=False)
                if pinned is None:  # an alias to read or a version to load: off the event loop
                    pinned = await asyncio.to_thread(self._pinned, body.version, may_block=True)
            except HTTPException as e:
                endpoint = "text" if body.text is not None else "vector"
                self.metrics.record(endpoint, None, str(e.status_code), (time.perf_counter() - t) * 1000)
                raise
        return await self._search(name, body, authorization, x_api_key, pinned, t)

    async def _search(
        self,
        name: str,
        body: SearchRequest,
        authorization: str | None,
        x_api_key: str | None,
        pinned: "Loaded | None" = None,
        t: float | None = None,
    ) -> Response:
        t = t or time.perf_counter()
        endpoint = "text" if body.text is not None else "vector"
        version = None
        try:
            self._collection(name)
            self._auth_query(authorization, x_api_key)
            cur = pinned or self._serving()  # read once: the whole answer comes from this version
            version = cur.version
            idx = cur.index
            if body.text is not None:
                if len(body.text) > self.cfg.serve.max_text_chars:
                    raise HTTPException(
                        413,
                        f"text has {len(body.text)} characters; the limit is "
                        f"{self.cfg.serve.max_text_chars} (serve.max_text_chars)",
                    )
                q = idx.embedder.embed_queries([body.text])
            else:
                if body.fingerprint != idx.fingerprint:
                    raise HTTPException(
                        409,
                        f"the vector was made in space {body.fingerprint}, but this server "
                        f"answers from version {idx.version} in space {idx.fingerprint}; embed "
                        "the query with that version's model, or send `text`",
                    )
                if len(body.vector) != idx.manifest.dims:
                    raise HTTPException(
                        422, f"vector has {len(body.vector)} dimensions; version {idx.version} has {idx.manifest.dims}"
                    )
                if not all(math.isfinite(x) for x in body.vector):
                    raise HTTPException(422, "vector has NaN or infinite values")
                import numpy as np

                q = np.asarray([body.vector], dtype=np.float32)
            if self.groups is None:
                hits, missing = idx.search_vectors(q, body.k)[0], None
            else:
                hits, missing = await self._fan_out(idx, q, body.k, body.partial)
            if body.text is not None and pinned is None:
                self._shadow_offer(body.text, [h.id for h in hits])
            ms = (time.perf_counter() - t) * 1000
            self.metrics.record(endpoint, version, "partial" if missing else "ok", ms)
            # The SearchResponse shape (the route's documented response_model), serialised directly.
            doc: dict[str, Any] = {
                "version": idx.version,
                "fingerprint": idx.fingerprint,
                "results": [{"id": h.id, "score": round(h.score, 6)} for h in hits],
                "took_ms": round(ms, 3),
            }
            if missing:
                doc.update(partial=True, missing_shards=missing)
            return Response(json.dumps(doc, separators=(",", ":")), media_type="application/json")
        except HTTPException as e:
            self.metrics.record(endpoint, version, str(e.status_code), (time.perf_counter() - t) * 1000)
            raise
        except VersionError as e:
            self.metrics.record(endpoint, version, "error", (time.perf_counter() - t) * 1000)
            raise HTTPException(500, str(e)) from e

    # --- shard groups (serve.shard_groups > 1) ------------------------------------------------
    async def _fan_out(self, idx: VersionIndex, q, k: int, partial: bool) -> tuple[list[Hit], list[int]]:
        """Ask every shard group for its top k of ``idx``'s version, concurrently, and merge."""
        assert self.groups is not None
        limit = self.cfg.serve.group_timeout_s

        G = len(self.groups)

        async def ask(g: int, handle):
            response = handle.search.remote((g, G), idx.version, q, k)
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()
                raise

        tasks = [asyncio.ensure_future(ask(g, h)) for g, h in enumerate(self.groups)]
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

    def _fan_out_blocking(self, idx: VersionIndex, q, k: int) -> list[Hit]:
        """:meth:`_fan_out` from a thread off the event loop (shadow traffic), run on the replica's loop:
        handles made with RAY_SERVE_THROUGHPUT_OPTIMIZED work only there."""
        limit = self.cfg.serve.group_timeout_s + 1
        return asyncio.run_coroutine_threadsafe(self._fan_out(idx, q, k, False), self._loop).result(limit)[0]

    def _prepare_groups(self, version: str) -> None:
        """From a thread off the event loop: have each shard group load ``version`` (one replica of each).
        Best effort: a group that cannot is named by the queries' fan-out (503, or missing in a partial answer)."""

        async def prepare_all():
            return await asyncio.gather(*(h.prepare.remote(version) for h in self.groups or ()), return_exceptions=True)

        try:
            got = asyncio.run_coroutine_threadsafe(prepare_all(), self._loop).result(self.cfg.serve.switch_timeout_s)
        except Exception as e:  # noqa: BLE001 - the timeout: the groups go on loading
            got = [e]
        for g, e in enumerate(got):
            if isinstance(e, BaseException):
                log.warning("shard group %s could not load %s: %s", g, version, one_line(e))

    def _merge(self, idx: VersionIndex, answers: dict, failed: dict[int, str], k: int, partial: bool):
        groups = len(self.groups or ())
        if failed and (not partial or not answers):
            what = "; ".join(f"shard group {g} of {groups} ({group_deployment(g)}): {why}" for g, why in failed.items())
            hint = "" if partial else '; ask again, or send "partial": true to accept the other groups\' answers'
            raise HTTPException(503, f"no complete answer from version {idx.version}: {what}{hint}")
        shards = idx.manifest.shards
        missing = sorted(s for g in failed for s in group_shards(len(shards), g, groups) if shards[s].rows)
        return merge_hits([a[0] for a in answers.values()], k), missing

    @app.post(
        "/v1/collections/{name}/reload",
        summary="Check the `active` alias now (admin token).",
        responses=errors(401, 403, 404, 500),
    )
    def reload(self, name: str, authorization: str | None = Header(None)):
        self._collection(name)
        want = _secret(self.cfg.serve.admin_token, "EMBRAY_ADMIN_TOKEN")
        if want is None:
            raise HTTPException(403, "reload is disabled: set serve.admin_token or EMBRAY_ADMIN_TOKEN on the server")
        got = _bearer(authorization)
        if got is None or not hmac.compare_digest(got, want):
            raise HTTPException(401, "reload needs `Authorization: Bearer <admin token>`")
        # The marker tells the other replicas (each polls it every second) to check too.
        try:
            self.store.write_bytes(reload_file(self.cfg.collection), json.dumps({"at": utcnow()}).encode())
        except EmbrayError as e:  # read-only store credentials: this replica still checks; the rest on their poll
            log.warning("reload marker not written (%s): other replicas switch on their next poll", e)
        switched = self.check()
        cur = self.current
        return {"version": cur.version if cur else None, "switched": switched, "error": self.last_error}


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):  # the server answers, whatever the input
    log.exception("unexpected error on %s: %s", request.url.path, exc)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)


def build(args: dict[str, Any]):
    """Application builder for `serve deploy` / `serve run`: ``args: {config: path/to/embray.yaml}``."""
    path = args.get("config") or os.environ.get("EMBRAY_CONFIG")
    if not path:
        raise ConfigError("the Serve application needs `args: {config: path/to/embray.yaml}` or EMBRAY_CONFIG")
    return application(load_config(path), os.path.dirname(os.path.abspath(path)))


def application(cfg: Config, base_dir: str = "."):
    """The bound application for ``cfg`` (replicas and limits from ``cfg.serve``): the ingress EmbrayServer and,
    with ``serve.shard_groups`` G > 1, the deployments EmbrayShardGroup0..G-1 it fans out to (made from the
    embray config alone, so a deploy config only overrides their autoscaling by name)."""
    payload = {"data": cfg.model_dump(mode="json"), "base_dir": base_dir}
    s = cfg.serve
    G = s.shard_groups
    groups = [
        EmbrayShardGroup.options(
            name=group_deployment(g),
            num_replicas=s.group_replicas,
            max_ongoing_requests=s.max_ongoing_requests,
            max_queued_requests=s.max_queued_requests,
            ray_actor_options={"num_cpus": s.group_num_cpus},
        ).bind(payload, g, G)
        for g in range(G)
    ]
    ingress = EmbrayServer.options(
        num_replicas=s.replicas,
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.num_cpus},
    )
    return ingress.bind(payload, groups) if G > 1 else ingress.bind(payload)
