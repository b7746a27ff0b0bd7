"""Builds: every new version (backfill, refresh, migration) goes through one pipeline.

    start   fingerprint, the parent's shards, corpus files (which changed) and schemas, an MLflow run
    scan    (:mod:`embray.pipeline.scan`)   one Ray task per new or changed source file -> row states, texts
    plan    (:mod:`embray.pipeline.plan`)   one Ray task per shard -> rejects, diff, chunks still to embed
    embed   (:mod:`embray.pipeline.embed`)  Ray Data actor pool -> vector cache files
    shards  (:mod:`embray.pipeline.shards`) one Ray task per shard -> embeddings part + USearch index
    commit  manifest last, create-only -> MLflow metrics, model version
    abandon on any failure: the version directory is removed, the run marked failed

A :class:`Build` is that lifecycle (in the spirit of Ray Data's ``Datasink``: ``on_write_start`` /
``write`` / ``on_write_complete`` / ``on_write_failed``); :func:`run_build` drives it, and
:func:`plan_build` runs only start, scan and plan, writing nothing but scratch files (a dry run).

Crash safety: nothing is visible before the manifest is committed. Embedded chunks stay in the cache
from the moment they finish, so a rerun after a kill finds them and embeds only what is left; scan,
plan and shards are cheap next to embedding and are simply redone. The result equals an uninterrupted
build's: the same ids, content hashes and vectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass

from embray.context import Context
from embray.errors import ConflictError, EmbrayError, ModelError, RegistryError, SourceError, StoreError, one_line
from embray.lifecycle.lock import Lease
from embray.lifecycle.versions import (
    BuildKind,
    BuildStats,
    IndexMeta,
    Manifest,
    ShardAction,
    ShardEntry,
    SourceFile,
    SourceMeta,
    VersionCounts,
    commit_manifest,
    new_version_id,
    utcnow,
    who,
)
from embray.models import fingerprint
from embray.pipeline.embed import check_pool_fits, embed_chunks, wait_for_node
from embray.pipeline.layout import Layout, choose, worker_memory
from embray.pipeline.passages import chunking, window_counter
from embray.pipeline.plan import ShardInputs, parent_shards, plan_shard
from embray.pipeline.scan import scan_file
from embray.pipeline.shards import THREADS as SHARD_THREADS
from embray.pipeline.shards import build_shard, cached_dims, shard_action
from embray.pipeline.types import BuildSpec, Embedded, ShardBuild, ShardPlan
from embray.pipeline.warm import TASK_CPUS, make_room
from embray.quality.estimate import estimate, past_worker_rss_mib, throughput_history
from embray.results import COUNTS, BuildResult, Counts, Estimate, PlanResult, SourceFiles, Truncation
from embray.runtime import gather, init_ray
from embray.storage import layout
from embray.storage.source import inspect_source, recorded_source

log = logging.getLogger("embray")


def _stage(kind: str, stage: str, error: type[EmbrayError], fn, *args):
    """Run one stage. Ray wraps a task's exception: an EmbrayError comes out as itself (whatever its
    constructor), anything else as ``error`` naming the stage and the cause."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - re-raised as an EmbrayError
        cause = getattr(e, "cause", None) or e
        if isinstance(cause, EmbrayError):
            if cause is e:
                raise
            raise cause from e
        raise error(f"the {kind} failed while {stage}: {one_line(e)}") from e


@dataclass
class _Timings:
    plan: float = 0.0
    embed: float = 0.0
    shards: float = 0.0


class Build:
    """One build of a version; ``dry_run`` builds go as far as the plan, in a scratch directory."""

    def __init__(self, ctx: Context, spec: BuildSpec, *, dry_run: bool = False, lease: Lease | None = None):
        self.ctx, self.cfg, self.store, self.spec, self.dry_run = ctx, ctx.cfg, ctx.store, spec, dry_run
        self.kind = spec.kind
        # A compaction rebuilds its parent's rows from the parent's files alone, with its index settings; every
        # other build reads the source and takes the config's.
        self.compact = spec.kind == BuildKind.COMPACT
        self.index_cfg = spec.parent.index if self.compact else ctx.cfg.index
        self.shards = self.index_cfg.shards
        self.run_id: str | None = None
        self.t0 = time.monotonic()
        self.times = _Timings()
        self.progress = ctx.progress
        self.estimate: Estimate | None = None
        self.embedded = Embedded(0)  # what the embedding did: rows, nodes, compute paths, workers' peak RSS
        self.layout: Layout | None = None  # the embedding workers' (set with the estimate)
        self.truncation: Truncation | None = None  # what the model's window leaves out (unchunked; after the plan)
        self.lease = lease  # the writer lease the caller holds: checked again right before the commit

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Checks first (fingerprint, corpus schemas, parent's shard count), then the MLflow run."""
        cfg = self.cfg
        init_ray(cfg.ray)
        check_pool_fits(cfg.embed, cfg.ray)
        make_room(TASK_CPUS, 0, "the scan, plan and shard tasks need a CPU")  # warm actors give way
        self.fp = self.spec.fingerprint or fingerprint(self.spec.model)
        self.chunk = chunking(cfg, self.kind, self.spec.model, self.spec.parent, self.spec.like)
        # One vector per row: the scan counts what the model's window leaves out of each row.
        counter = None if self.chunk or self.compact else window_counter(self.spec.model)
        self.window = counter.window if counter else None
        self.parents = parent_shards(self.spec.parent, self.fp, self.shards, self.chunk)
        if self.compact:  # the parent's rows, from what it recorded: the corpus is not read
            self.src = recorded_source(cfg.source, self.spec.parent)
            self.source_meta = self.spec.parent.source
        else:
            before = self._parent_inputs()
            prev = self.spec.parent.source if before else None
            # (reads only the new and changed files)
            self.src = inspect_source(cfg.source, before, prev.id_type if prev else "", prev.columns if prev else None)
            self.source_meta = SourceMeta(
                uri=cfg.source.uri,
                id_column=cfg.source.id_column,
                text_column=cfg.source.text_column,
                files=len(self.src.files),
                digest=self.src.digest,
                id_type=self.src.id_type,
                updated_at_column=cfg.source.updated_at_column,
                columns=self.src.columns,
                store_text=cfg.source.store_text or cfg.index.keywords,  # (a keyword index is built of the texts)
            )
        self.vid = new_version_id()
        # A dry run writes only scratch files, outside versions/ (gc and listings never see it), and takes no lease.
        self.vdir = (
            layout.scratch_dir(cfg.collection, self.vid)
            if self.dry_run
            else layout.version_dir(cfg.collection, self.vid)
        )
        self.staged = layout.staging_dir(self.vdir)
        # Row states of the files this build reads, kept beside the versions (shared); a dry run's are scratch.
        self.states = f"{self.vdir}/sources" if self.dry_run else layout.sources_dir(cfg.collection)
        self.cdirs = [layout.cache_dir(cfg.collection, self.fp, k, self.shards) for k in range(self.shards)]
        parent = self.spec.parent
        log.info(
            "%s %s: %d files from %s -> %s%s",
            self.kind,
            self.vid,
            len(self.src.files),
            cfg.source.uri,
            self.store.url(self.vdir),
            f" (parent {parent.version})" if parent else "",
        )
        if not self.dry_run:
            reg = self.ctx.registry
            self.run_id = reg.start_run(self.vid, self.kind, self._params())
            src_uri = self.source_meta.uri
            reg.log_corpus(self.run_id, src_uri, self.src.digest, {"id": self.src.id_type, "text": "string"})

    def _parent_inputs(self) -> list[SourceFile]:
        """What the parent read of each source file, when it can stand for this build's reading: the same
        vector space (so its rows need no new embedding) and the same source and columns."""
        parent = self.spec.parent
        if parent is None or self.parents[0] is None:
            return []
        return list(parent.inputs) if parent.source.reads_like(self.cfg.source) else []

    def unchanged_corpus(self) -> bool:
        """Every source file is one the parent read, unchanged, and none is gone: nothing to plan."""
        parent, src = self.spec.parent, self.src
        return (
            parent is not None
            and bool(parent.inputs)
            and len(src.files) == len(parent.inputs)
            and all(prev is not None for prev in src.unchanged)
        )

    def _params(self) -> dict:
        cfg, spec = self.cfg, self.spec
        return {
            "collection": cfg.collection,
            "version": self.vid,
            "parent": spec.parent.version if spec.parent else "",
            "model": spec.model.label,
            "backend": spec.model.backend,
            "fingerprint": self.fp,
            "corpus_uri": self.source_meta.uri,
            "corpus_files": len(self.src.files),
            "store_uri": cfg.store.uri,
            "index.metric": self.index_cfg.metric,
            "index.dtype": self.index_cfg.dtype,
            "index.shards": self.shards,
            **(self.chunk.params() if self.chunk else {"chunk": "none"}),
            "source.columns": ",".join(self.source_meta.columns) or "none",
            "source.store_text": self.source_meta.store_text,
            "index.keywords": self.index_cfg.keywords,
            "embed.batch_size": cfg.embed.batch_size,
            "embed.actors": cfg.embed.actors or "auto",
            **spec.params,
        }

    def scan(self) -> int:
        """Stage 1, for the new and changed files only; returns the corpus's rows (read or reused)."""
        import ray

        sc, src, task = self.cfg.source, self.src, ray.remote(num_cpus=1)(scan_file)
        todo = [i for i, prev in enumerate(src.unchanged) if prev is None]
        args = (sc.id_column, sc.text_column, self.shards, self.store, self.staged, self.states, sc.updated_at_column)
        columns = self.src.columns
        shared = layout.sources_dir(self.cfg.collection)
        before = {f.path: f"{shared}/{f.state.path}" for f in self._parent_inputs()}
        chunk = (self.chunk, self.spec.model) if self.chunk else None
        count = self.spec.model if self.window else None
        refs = [
            task.remote(src, i, *args, not self.dry_run, before.get(src.seen[i].path), chunk, count, columns)
            for i in todo
        ]
        self.progress.stage("scan", len(refs), "files")
        done = _stage(self.kind, "reading the corpus", SourceError, gather, refs, self.progress.advance)
        read = dict(zip(todo, done, strict=True))
        self.inputs: list[SourceFile] = []
        self.state_rels: list[str] = []
        for i, (seen, prev) in enumerate(zip(src.seen, src.unchanged, strict=True)):
            rows, state = read[i] if prev is None else (prev.rows, prev.state)
            where = self.states if prev is None else layout.sources_dir(self.cfg.collection)
            self.state_rels.append(f"{where}/{state.path}")
            self.inputs.append(SourceFile(**dataclasses.asdict(seen), rows=rows, state=state))
        self.files = SourceFiles(read=len(todo), reused=len(src.files) - len(todo))
        return sum(f.rows for f in self.inputs)

    def plan(self) -> list[ShardPlan]:
        """Stage 2."""
        import ray

        sc, src = self.cfg.source, self.src
        urls = [src.url(f) for f in src.files]
        chunked = self.chunk is not None
        meta = self.source_meta
        kept = {"columns": meta.columns, "store_text": meta.store_text}
        inputs = ShardInputs(self.state_rels, urls, self.staged, src, sc.text_column, self.compact, chunked, **kept)
        inputs = ray.put(inputs)
        task = ray.remote(num_cpus=1)(plan_shard)
        refs = [
            task.remote(
                self.store,
                inputs,
                self.vdir,
                k,
                self.parents[k],
                self.cdirs[k],
                self.fp,
                self.cfg.embed.batch_size,
                self.dry_run,
            )
            for k in range(self.shards)
        ]
        self.progress.stage("plan", len(refs), "shards")
        return _stage(self.kind, "planning the shards", StoreError, gather, refs, self.progress.advance)

    def embed(self, plans: list[ShardPlan]) -> Embedded:
        """Stage 3; returns the texts embedded and the nodes they were embedded on."""
        chunks = [c for p in plans for c in p.chunks]
        self.chunks = chunks
        layout = self.layout
        assert layout is not None, "forecast() chooses the layout before embed()"
        ec = layout.apply(self.cfg.embed)
        if chunks:
            if self.cfg.embed.actors is None:  # a configured layout was checked in start(); this is the machine's
                check_pool_fits(ec, self.cfg.ray)  # a 1-CPU local Ray still gets refused
            log.info("%s %s: embedding layout %s", self.kind, self.vid, layout)
            if self.run_id:
                self.ctx.registry.log_params(self.run_id, {"embed.layout": str(layout)[:500]})
            wait_for_node(ec, self.cfg.ray)  # fails naming what no node offers, instead of hanging
        self.progress.stage("embed", sum(c.rows for c in chunks), "texts")
        return _stage(
            self.kind,
            "embedding",
            ModelError,
            embed_chunks,
            ec,
            self.spec.model,
            self.fp,
            self.store,
            chunks,
            self.progress.advance,
            self.estimate.texts_per_s if self.estimate else None,
        )

    def build_shards(self, plans: list[ShardPlan]) -> tuple[int, list[ShardBuild]]:
        """Stage 4; returns (dims, shards)."""
        import ray

        dims = (
            self.spec.parent.dims
            if self.parents[0] is not None
            else cached_dims(self.store, self.chunks, self.cdirs, self.spec.model.dims)
        )
        task = ray.remote(num_cpus=SHARD_THREADS)(build_shard)  # one USearch thread each
        refs = [
            task.remote(
                self.store,
                self.staged,
                self.vdir,
                dims,
                self.index_cfg,
                self.fp,
                plans[k],
                self.parents[k],
                self.cdirs[k],
            )
            for k in range(self.shards)
        ]
        self.progress.stage("shards", len(refs), "shards")
        return dims, _stage(self.kind, "building the shards", StoreError, gather, refs, self.progress.advance)

    def commit(
        self, input_rows: int, plans: list[ShardPlan], counts: Counts, dims: int, built: list[ShardBuild]
    ) -> Manifest:
        """Write the manifest, last and create-only: from here on the version exists."""
        self.store.delete(self.staged)
        cfg, spec = self.cfg, self.spec
        rows, rejected, by_reason = _totals(plans)
        entries: list[ShardEntry] = [b.entry for b in built]
        manifest = Manifest(
            collection=cfg.collection,
            version=self.vid,
            parent=spec.parent.version if spec.parent else None,
            created=utcnow(),
            created_by=who(),
            model=spec.model,
            fingerprint=self.fp,
            dims=dims,
            index=IndexMeta(**self.index_cfg.model_dump()),
            chunk=self.chunk,
            source=self.source_meta,
            counts=VersionCounts(
                kind=self.kind,
                input_rows=input_rows,
                rows=rows,
                documents=sum(p.documents for p in plans) if self.chunk else None,
                truncated=self.truncation.rows if self.truncation else None,
                truncated_tokens=self.truncation.tokens if self.truncation else None,
                rejected=rejected,
                by_reason=by_reason,
                **counts.to_dict(),
                shards_reused=sum(1 for b in built if b.action == ShardAction.REUSED),
                shards_updated=sum(1 for b in built if b.action == ShardAction.UPDATED),
                shards_delta=sum(1 for b in built if b.action == ShardAction.DELTA),
                files_read=self.files.read,
                files_reused=self.files.reused,
            ),
            shards=entries,
            content_digest=hashlib.sha256("".join(e.content_digest for e in entries).encode()).hexdigest(),
            stats=BuildStats(
                seconds=round(time.monotonic() - self.t0, 3),
                plan_seconds=round(self.times.plan, 3),
                embed_seconds=round(self.times.embed, 3),
                shard_seconds=round(self.times.shards, 3),
            ),
            mlflow_run_id=self.run_id,
            inputs=self.inputs,
        )
        if self.lease is None:
            self.uri = commit_manifest(self.store, manifest)
            return manifest
        try:  # fenced by the lease: a writer paused past it (and taken over) commits nothing
            self.lease.commit(layout.manifest_rel(manifest.collection, self.vid), manifest.to_json())
        except ConflictError as e:
            raise ConflictError(f"{e}; nothing was committed (rerun the command if it is still needed)") from e
        self.uri = self.store.url(layout.version_dir(manifest.collection, self.vid))
        return manifest

    def record(self, manifest: Manifest) -> BuildResult:
        """After the commit: the run's metrics, its end, and the MLflow model version."""
        c = manifest.counts
        seconds = manifest.stats.seconds
        log.info("committed %s: %d rows, %d rejected, %.1fs", self.vid, manifest.rows, c.rejected, seconds)
        reg = self.ctx.registry
        metrics = {
            **{k: c[k] for k in ("rows", "rejected", "input_rows", *COUNTS, "shards_reused", "shards_updated")},
            "shards_delta": c.shards_delta,
            **({"documents": c.documents} if c.documents is not None else {}),
            **({"truncated_rows": c.truncated, "truncated_tokens": c.truncated_tokens} if self.truncation else {}),
            "files_read": self.files.read,
            "files_reused": self.files.reused,
            "seconds": seconds,
            "embed_seconds": self.times.embed,
            "rows_per_s": manifest.rows / seconds if seconds else 0.0,
            **{f"rejected.{k.replace(' ', '_')}": v for k, v in c.by_reason.items()},
        }
        own = [f.bytes for f in manifest.files() if f.version in (None, self.vid)]
        reused = self.src.unchanged
        new_states = {i.state.path: i.state.bytes for i, p in zip(manifest.inputs, reused, strict=True) if p is None}
        metrics["bytes_added"] = sum(own) + sum(new_states.values())
        est = self.estimate  # estimate vs actual, side by side in the run
        if est is not None:
            numbers = {"seconds": est.seconds, "to_embed": est.to_embed, "bytes_added": est.bytes_added}
            metrics.update({f"estimate.{k}": v for k, v in numbers.items() if v is not None})
        emb = self.embedded
        if emb.peak_rss_mib is not None:
            metrics["embed.worker_peak_rss_mib"] = emb.peak_rss_mib
        reg.log_metrics(self.run_id, metrics)
        compute = "; ".join(emb.compute) or "none"
        reg.log_params(self.run_id, {"embed.nodes": ",".join(emb.nodes) or "none", "embed.compute": compute[:6000]})
        reg.end_run(self.run_id, ok=True)
        return BuildResult(
            version=self.vid,
            parent=manifest.parent,
            uri=self.uri,
            fingerprint=self.fp,
            rows=c["rows"],
            rejected=c["rejected"],
            rejected_by_reason=dict(c["by_reason"]),
            counts=Counts(**{k: c[k] for k in COUNTS}),
            seconds=seconds,
            model_version=reg.register(manifest, self.uri),
            embed_nodes=emb.nodes,
            embed_compute=emb.compute,
            embed_worker_peak_rss_mib=emb.peak_rss_mib,
            source_files=self.files,
            manifest=manifest,
            documents=c.documents,
            truncation=self.truncation,
        )

    def forecast(self, plans: list[ShardPlan], counts: Counts) -> Estimate:
        """What the planned build will cost (from this model's earlier builds in MLflow), and the embedding
        workers' layout (:mod:`embray.pipeline.layout`: the machine's, their memory from those builds)."""
        import ray

        parents = self.parents
        history = throughput_history(self.ctx.registry, self.fp)
        memory = worker_memory(self.cfg.embed, self.spec.model, past_worker_rss_mib(history))
        self.layout = choose(self.cfg.embed, self.spec.model, ray.nodes(), memory)
        return estimate(
            self.cfg.model_copy(update={"embed": self.layout.apply(self.cfg.embed)}),
            to_embed=counts.embedded,
            rows=sum(p.rows for p in plans),
            rows_written=sum(_rows_written(p, parents[p.shard], self.index_cfg) for p in plans),
            shards=_shard_actions(plans, parents, self.index_cfg),
            dims=self.spec.parent.dims if parents[0] is not None else self.spec.model.dims,
            history=history,
        )

    def abandon(self, e: BaseException) -> None:
        """Remove what the failed build wrote and record the failure; never hides the original error.

        The vector cache is kept: it only ever holds finished chunks, and a rerun reuses them. A build whose
        commit the lease already decided keeps its files: the next writer finishes that commit.
        """
        if self.lease is not None and self.lease.decided:
            log.error(
                "%s failed after its commit was decided (%s); its files stay and the next writer finishes the commit",
                self.vid,
                e,
            )
            return
        if not self.dry_run:
            log.error("build failed (%s); removing %s", e, self.store.url(self.vdir))
        try:
            self.store.delete(self.vdir)
        except EmbrayError as cleanup:
            log.error(
                "could not remove %s: %s (it has no manifest, so it is not visible)", self.store.url(self.vdir), cleanup
            )
        if self.run_id is None:
            return
        try:
            self.ctx.registry.end_run(self.run_id, ok=False, error=f"{type(e).__name__}: {e}")
        except EmbrayError as mlflow_error:
            log.error("could not mark MLflow run %s failed: %s", self.run_id, mlflow_error)


def _totals(plans: list[ShardPlan]) -> tuple[int, int, dict[str, int]]:
    """(rows, rejected, rejected by reason) over every shard."""
    by_reason: dict[str, int] = {}
    for p in plans:
        for r, n in p.by_reason.items():
            by_reason[r] = by_reason.get(r, 0) + n
    return sum(p.rows for p in plans), sum(p.rejected for p in plans), by_reason


def _truncation(plans: list[ShardPlan], window: int | None) -> Truncation | None:
    """What the model's window leaves out of the rows (None: not counted)."""
    counted = [p for p in plans if p.truncated is not None]
    if window is None or not counted:
        return None
    return Truncation(sum(p.truncated for p in counted), sum(p.truncated_tokens for p in counted), window)


def _planned(b: Build) -> tuple[int, list[ShardPlan], Counts]:
    t = time.monotonic()
    input_rows = b.scan()
    plans = b.plan()
    b.times.plan = time.monotonic() - t
    counts = sum((p.counts for p in plans), Counts())
    rows, rejected, _ = _totals(plans)
    b.truncation = _truncation(plans, b.window)
    if b.truncation and b.truncation.rows:
        t = b.truncation
        log.warning(
            "%d of %d rows are longer than model %s's window of %d tokens: %d of their tokens are not embedded; "
            "set chunk: {tokens: null} to embed every passage of a long document",
            t.rows,
            rows,
            b.spec.model.label,
            t.window,
            t.tokens,
        )
    log.info(
        "%s %s planned in %.1fs: %d rows (%d rejected), %s",
        b.kind,
        b.vid,
        b.times.plan,
        rows,
        rejected,
        ", ".join(f"{k} {v}" for k, v in counts.to_dict().items()),
    )
    return input_rows, plans, counts


def run_build(ctx: Context, spec: BuildSpec, lease: Lease | None = None) -> BuildResult:
    """Build one version of ``ctx``'s collection. The caller holds the writer ``lease``."""
    b = Build(ctx, spec, lease=lease)
    b.start()
    try:
        input_rows, plans, counts = _planned(b)
        b.estimate = b.forecast(plans, counts)
        rows, rejected, by_reason = _totals(plans)
        if rows == 0:
            raise SourceError(
                f"the source corpus {ctx.cfg.source.uri} has no embeddable rows "
                f"({rejected} rejected: {by_reason}); add data before a {spec.kind}"
            )
        t = time.monotonic()
        b.embedded = emb = b.embed(plans)
        embedded = emb.rows
        b.times.embed = time.monotonic() - t
        log.info(
            "%s %s: embedded %d rows in %.1fs on node(s) %s; compute: %s; workers' peak RSS %s",
            b.kind,
            b.vid,
            embedded,
            b.times.embed,
            emb.nodes,
            "; ".join(emb.compute) or "none",
            f"{emb.peak_rss_mib:.0f} MiB" if emb.peak_rss_mib is not None else "n/a",
        )
        t = time.monotonic()
        dims, built = b.build_shards(plans)
        b.times.shards = time.monotonic() - t
        b.progress.stage("commit")
        manifest = b.commit(input_rows, plans, Counts(**{**counts.to_dict(), "embedded": embedded}), dims, built)
    except BaseException as e:
        b.progress.close()
        b.abandon(e)
        raise
    try:
        return b.record(manifest)
    except RegistryError as e:  # MLflow went away after the commit: the version is there, and complete
        raise RegistryError(
            f"{e}; version {b.vid} was committed (complete and verifiable) and the next embray command that "
            "reaches MLflow registers it"
        ) from e
    finally:
        b.progress.close()


def _nothing_changed(b: Build, parent: Manifest) -> PlanResult:
    """The plan of a corpus whose every file is as the parent read it: the parent's rows, all reused."""
    c = parent.counts
    return PlanResult(
        parent=parent.version,
        fingerprint=b.fp,
        rows=parent.rows,
        rejected=c.rejected,
        rejected_by_reason=dict(c.by_reason),
        counts=Counts(reused=parent.rows),
        to_embed=0,
        oldest_stale_us=None,
        seconds=time.monotonic() - b.t0,
        source_files=SourceFiles(read=0, reused=len(b.src.files)),
    )


def _rows_written(p: ShardPlan, parent, index_cfg) -> int:
    """Rows a shard's new files will hold: none reused, the change in a delta segment, else the shard."""
    action = shard_action(p, parent, index_cfg)
    if action == ShardAction.REUSED:
        return 0
    return p.counts.new + p.counts.changed if action == ShardAction.DELTA else p.rows


def _shard_actions(plans: list[ShardPlan], parents: list, index_cfg) -> dict[str, int]:
    """How many shards a build rebuilds, updates in place, writes a delta segment for, and reuses."""
    out = {a.value: 0 for a in (ShardAction.REBUILT, ShardAction.UPDATED, ShardAction.REUSED, ShardAction.DELTA)}
    for p in plans:
        out[shard_action(p, parents[p.shard], index_cfg).value] += 1
    return out


def plan_build(ctx: Context, spec: BuildSpec, *, with_estimate: bool = False) -> PlanResult:
    """Only plan a build (a dry run): what it would embed, reuse and drop, and (``with_estimate``) what it
    would cost. Writes only scratch files."""
    b = Build(ctx, spec, dry_run=True)
    b.start()
    if not with_estimate and b.unchanged_corpus():
        b.progress.close()
        ctx.store.delete(b.vdir)
        return _nothing_changed(b, spec.parent)
    try:
        _, plans, counts = _planned(b)
    finally:
        b.progress.close()
        ctx.store.delete(b.vdir)
    rows, rejected, by_reason = _totals(plans)
    stale = [p.oldest_stale_us for p in plans if p.oldest_stale_us is not None]
    return PlanResult(
        parent=spec.parent.version if spec.parent else None,
        fingerprint=b.fp,
        rows=rows,
        rejected=rejected,
        rejected_by_reason=by_reason,
        counts=Counts(**{**counts.to_dict(), "embedded": 0}),  # planned; nothing was sent
        to_embed=counts.embedded,
        oldest_stale_us=min(stale) if stale else None,
        seconds=time.monotonic() - b.t0,
        estimate=b.forecast(plans, counts) if with_estimate else None,
        source_files=b.files,
        documents=sum(p.documents for p in plans) if b.chunk else None,
        truncation=b.truncation,
    )
