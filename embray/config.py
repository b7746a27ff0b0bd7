"""The embray configuration: one YAML file, validated by pydantic.

    collection: docs
    source: {uri: ./corpus, id_column: id, text_column: text, storage_options: {}}
    store: {uri: ./.embray, storage_options: {}}
    model: {backend: sentence-transformers, name: all-MiniLM-L6-v2}
    index: {metric: cos, dtype: f16, shards: 4}
    embed: {batch_size: 256, actors: 1, keep_warm_s: 300}   # small jobs reuse a loaded model
    mlflow: {tracking_uri: null}     # null: a sqlite file under the store root
    ray: {address: null}             # null: a local Ray
    serve: {port: 8000, poll_s: 10}  # the Ray Serve endpoint (see serve/README.md)
    monitor: {max_stale_fraction: 0.05, recall_floor: 0.95}   # status, gates, audit

Relative local paths are resolved against the directory of the config file,
so a config means the same thing whatever the working directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from embray.errors import ConfigError
from embray.models.spec import ModelSpec

_COLLECTION_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SECRET_KEYS = ("secret", "password", "token", "key")


GIB = 1 << 30  # the unit of embed.memory_gib (bytes)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file`` (``s3://``, ``gs://``...)."""
    return "://" in uri and not uri.startswith("file://")


class SourceConfig(_Strict):
    uri: str = Field(description="Parquet file or directory of Parquet files: a local path or s3://bucket/prefix.")
    id_column: str = Field("id", description="Column holding each row's unique id (string or integer).")
    text_column: str = Field("text", description="Column holding the text to embed.")
    updated_at_column: str | None = Field(
        "updated_at",
        description="Timestamp column of when a row last changed; used (when present) for the age of stale rows.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for s3fs and the pyarrow reads, e.g. {client_kwargs: {endpoint_url: ...}}.",
    )
    columns: list[str] = Field(
        default_factory=list,
        description="Metadata columns kept in each version beside the vectors, for search filters and hit fields "
        "(strings, integers, floats, booleans, timestamps, dates, lists of strings; types from the Parquet schema).",
    )
    store_text: bool = Field(
        False, description="Keep each row's text (a chunked version's: each passage's) in the version, for hit fields."
    )

    @model_validator(mode="after")
    def _check_columns(self) -> SourceConfig:
        from embray.storage.metadata import check_names

        check_names(self.columns, self.id_column, self.text_column)
        return self


class StoreConfig(_Strict):
    uri: str = Field("./.embray", description="Where versions are written: a local directory or s3://bucket/prefix.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for the store, e.g. retries: "
        "{config_kwargs: {retries: {mode: standard, total_max_attempts: 5}}} (README: Retries on S3).",
    )
    lease_ttl_s: float = Field(
        60.0,
        gt=0,
        description="Seconds a writer's lease lasts unless renewed (every third of it): a crashed or paused writer's "
        "lease is taken over after this; a writer paused longer finds it taken and commits nothing.",
    )


class IndexConfig(_Strict):
    metric: Literal["cos", "ip", "l2sq"] = Field("cos", description="USearch metric.")
    dtype: Literal["f32", "f16", "bf16", "i8"] = Field("f16", description="Scalar type the shards store vectors as.")
    shards: int = Field(4, ge=1, le=4096, description="Number of USearch shards; rows are hash-partitioned by id.")
    connectivity: int = Field(16, ge=2, le=256, description="HNSW graph degree (M).")
    expansion_add: int = Field(128, ge=1, description="HNSW ef at build time.")
    expansion_search: int = Field(64, ge=1, description="HNSW ef at query time.")
    max_delta_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="A refresh leaves a shard's index as it is and writes a delta segment (the new and changed "
        "rows, with an index of their own) and tombstones (the keys changed or deleted) while the shard's segment "
        "rows and its tombstones each stay within this fraction of its base rows; past it, or past max_segments, "
        "the refresh compacts the shard (rebuilds it whole, nothing re-embedded). 0: never segments.",
    )
    max_segments: int = Field(
        8, ge=0, description="Delta segments a shard may accumulate before a refresh compacts it (0: never segments)."
    )
    keywords: bool = Field(
        False,
        description="Also build a BM25 keyword index of each shard (and delta segment) beside its vectors, for "
        "search modes keyword and hybrid; the version then keeps each row's text (as source.store_text does).",
    )


class ChunkConfig(_Strict):
    """``chunk:``: cut each document into passages that fit the model's window, one vector each (long documents).

    ``chunk: none`` embeds one vector per row, truncated at the model's window (the rows that lost text are
    counted). Left out: a version keeps the chunking of the version it follows (a refresh its parent's, a
    backfill the active version's); a new collection's is passages sized to the model's window (none for the
    'hash' model, which has no window)."""

    tokens: int | None = Field(
        None,
        ge=8,
        description="Tokens per passage, the model's special tokens and document_prefix included, counted by the "
        "model's own tokenizer; null: the model's window (max_seq_length). Never more than the window.",
    )
    overlap: int = Field(
        32, ge=0, description="Tokens of the previous passage each passage starts with (from a word boundary)."
    )

    @model_validator(mode="after")
    def _fits(self) -> ChunkConfig:
        if self.tokens is not None and self.overlap >= self.tokens // 2:
            raise ValueError(f"overlap {self.overlap} must be under half of tokens {self.tokens}")
        return self


class EmbedConfig(_Strict):
    batch_size: int = Field(256, ge=1, description="Rows per batch handed to one embedding actor.")
    actors: int | None = Field(
        None,
        ge=1,
        description="Embedding actors in the Ray Data actor pool. null: the machine decides (embray.pipeline.layout): "
        "on CPU nodes one actor of one thread per core, each reserving an equal share of all cores but one (left "
        "for the scan, plan and shard tasks; 2 cores: 2 actors x 0.5 CPU x 1 thread), no more than the nodes' "
        "memory holds at embed.memory_gib each; with embed.num_gpus, one per that many GPUs. The build logs what "
        "it chose (MLflow param embed.layout).",
    )
    num_cpus: float = Field(
        1.0,
        ge=0,
        description="CPUs each actor reserves; keep below the node's CPUs so reads and writes still run. With "
        "embed.actors null on CPU nodes the layout sets it.",
    )
    memory_gib: float | None = Field(
        None,
        ge=0,
        description="Memory (GiB) each embedding actor, task or warm actor declares to Ray (memory=), so Ray places "
        "them only where it is free. null: 1.25 x the largest peak RSS this model's workers reached in this "
        "collection's earlier builds (MLflow metric embed.worker_peak_rss_mib), or before any, an estimate from "
        "the model's weight files (MiniLM: ~1.3 GiB); 0: declare none.",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs each actor reserves (GPU nodes in production).")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each embedding actor or task reserves, e.g. {accelerator: 1}: embedding "
        "then runs only on the nodes that offer them (start those with `ray start --resources`). The build "
        "records the nodes it embedded on (MLflow param embed.nodes, `embed_nodes` in --json).",
    )
    placement_timeout_s: float = Field(
        120.0,
        gt=0,
        description="How long a build waits for an alive node that offers embed.num_cpus, num_gpus and "
        "resources (an autoscaling cluster may be adding one) before it fails naming what is missing: before "
        "embedding, and again when such a node is lost mid-build (a rerun resumes from the vector cache).",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="Torch threads per actor; null: 1 where embed.actors is null on CPU nodes, else every core of "
        "the node. On CPU nodes prefer one actor per "
        "core with threads: 1 (e.g. 2 cores: actors 2, num_cpus 0.5, threads 1): measured on 2 cores it was as "
        "fast as one actor of 2 threads on long texts and up to 1.44x faster on short ones (docs/benchmarks.md), "
        "because Ray runs workers at nice 15 and a multi-threaded actor stalls at every operator whenever the "
        "driver or raylet takes one of its cores, "
        "and because a second actor overlaps tokenisation and Python work with the first one's matmuls. With the "
        "fused CPU graph (AMD EPYC, 2 cores): 2 x 1 was 1.06x faster on long texts and as fast on short ones.",
    )
    keep_warm_s: float = Field(
        300.0,
        ge=0,
        description="Small jobs (up to 4 batches: a typical refresh or monitor refresh; or what this collection's "
        "earlier builds with the model say one worker embeds within 5 s) embed in a detached actor "
        "per model fingerprint that keeps the model loaded this many seconds after its last use, so the next "
        "small job skips the model load; it holds embed.num_cpus / embed.num_gpus while alive, and gives way "
        "to a build that needs them. It lives as long as the Ray it runs on (a cluster, `ray start`, the monitor "
        "loop, a notebook); a local Ray started by one command ends with it. 0: load the model in a plain task "
        "every time.",
    )

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"{name} is not a custom resource: use embed.num_cpus / embed.num_gpus instead")
            if amount <= 0:
                raise ValueError(f"resource {name}: {amount} must be > 0")
        return v


class MlflowConfig(_Strict):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; null: sqlite file under the store root.")
    experiment: str | None = Field(None, description="Experiment name; null: embray/<collection>.")
    max_retries: int = Field(
        5,
        ge=0,
        le=10,
        description="Retries of an MLflow request that cannot connect or gets a 5xx/429 (as MLflow's "
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES, but for embray's own MLflow calls only, so a Serve replica's short budget "
        "and a build's long one do not mix). With backoff_s 1 a server restart of about 30 s is ridden out; a "
        "longer outage fails the command with one line (a build's committed version is registered "
        "by the next command). The Serve app uses at most 1, so its alias poll never stalls.",
    )
    backoff_s: int = Field(
        1, ge=0, le=30, description="Backoff factor between those retries: waits of 0, 2x, 4x, 8x ... seconds."
    )
    timeout_s: int = Field(30, ge=1, le=600, description="Seconds one MLflow request may take.")


class RayConfig(_Strict):
    address: str | None = Field(
        None,
        description="Ray address ('auto', 'host:6379', 'ray://...'). null: inside a Ray job (RAY_ADDRESS set) the "
        "job's cluster, elsewhere a new local Ray of this process (never one `ray start` left on the machine).",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray; null: all of this machine's.")


class ShadowConfig(_Strict):
    fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of live text queries also sent to the `candidate` version after they are answered "
        "(0: off); their overlap@10 with the active answer and the candidate's latency are recorded.",
    )
    max_pending: int = Field(
        8, ge=1, description="Shadow queries a replica holds waiting; beyond it they are dropped (counted) first."
    )


class ServeConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address `embray serve` listens on.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of `embray serve`.")
    poll_s: float = Field(10.0, gt=0, description="Seconds between checks of the `active` alias.")
    admin_token: str | None = Field(
        None, description="Bearer token for POST .../reload; null: env EMBRAY_ADMIN_TOKEN; neither: reload refused."
    )
    api_key: str | None = Field(None, description="If set (or env EMBRAY_API_KEY), queries need header X-API-Key.")
    max_text_chars: int = Field(8192, ge=1, description="Longest query text accepted (413 above it).")
    max_batch: int = Field(64, ge=1, description="Most queries in one request's `queries` batch (413 above it).")
    max_loaded_versions: int = Field(
        3,
        ge=1,
        description="Versions one replica holds at once: the active one, and up to N - 1 that queries pinned with "
        '{"version": ...} (loaded on demand, least recently used unloaded first; 1: a pinned query loads its '
        "version, answers and lets it go).",
    )
    replicas: int = Field(
        1,
        ge=1,
        description="Serve replicas of the ingress deployment (EmbrayServer). With shard_groups 1 each holds the "
        "version's encoder and all its shards; with more, each holds only the encoder and fans queries out.",
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs each ingress replica (EmbrayServer) reserves.")
    shard_groups: int = Field(
        1,
        ge=1,
        description="Split each version's shards into this many groups, each served by its own deployment "
        "(EmbrayShardGroup0, 1, ...) whose replicas load only their shards (every G-th shard from g); the ingress "
        "embeds a text query once, asks every group, and merges the top k by score, then id. 1: one deployment "
        "holds everything. Use it when a version does not fit one replica's memory.",
    )
    group_replicas: int = Field(1, ge=1, description="Replicas of each shard-group deployment (shard_groups > 1).")
    group_num_cpus: float = Field(1.0, ge=0, description="CPUs each shard-group replica reserves.")
    group_timeout_s: float = Field(
        5.0,
        gt=0,
        description="A shard group that has not answered a query within this fails it with 503 naming the group "
        '(or, for a request with "partial": true, is left out and named in `missing_shards`).',
    )
    switch_timeout_s: float = Field(
        120.0,
        gt=0,
        description="How long the ingress waits, on a new active version, for every shard-group replica to report "
        "it loaded and warm before it switches; past it the switch is put off to the next check (still serving "
        "the old version; the reason in the info endpoint's last_error).",
    )
    placement_timeout_s: float = Field(
        300.0,
        ge=0,
        description="`embray serve` on a cluster (ray.address or RAY_ADDRESS) whose nodes cannot hold every replica "
        "(replicas x num_cpus + shard_groups x group_replicas x group_num_cpus) deploys anyway, so that an "
        "autoscaler sees the demand, says what it waits for, and gives up after this many seconds naming the "
        "shortfall. A local Ray of its own is checked at once (no node will join it).",
    )
    max_ongoing_requests: int = Field(32, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int = Field(64, ge=0, description="Requests queued per caller before 503s (overload).")
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="End-to-end limit of one request at Serve's HTTP proxy (http_options.request_timeout_s of "
        "`embray serve`; set the same in serve/config.yaml): past it the caller gets 408 instead of waiting, e.g. "
        "on a replica lost mid-request.",
    )
    url: str | None = Field(None, description="Where the deployed endpoint answers (for `embray status`).")
    shadow: ShadowConfig = Field(default_factory=ShadowConfig, description="Shadow traffic to the candidate.")

    @model_validator(mode="after")
    def _room_for_two_versions(self) -> ServeConfig:
        if self.shard_groups > 1 and self.max_loaded_versions < 2:
            raise ValueError(
                "serve.shard_groups > 1: a group replica holds the old and the new version during a switch; set "
                "serve.max_loaded_versions to 2 or more (default 3)"
            )
        return self

    @model_validator(mode="after")
    def _room_for_the_candidate(self) -> ServeConfig:
        if self.shadow.fraction > 0 and self.max_loaded_versions < 2:
            raise ValueError(
                "serve.shadow.fraction > 0 sends queries to the candidate, which a replica must hold beside the "
                "active version: set serve.max_loaded_versions to 2 or more (default 3)"
            )
        return self


class MonitorConfig(_Strict):
    max_stale_fraction: float = Field(
        0.05, ge=0, le=1, description="`status` fails (and the monitor refreshes) above this stale fraction."
    )
    max_stale_age_s: float | None = Field(
        None, gt=0, description="`status` fails when the oldest stale row changed longer ago than this (seconds)."
    )
    recall_floor: float = Field(0.95, ge=0, le=1, description="Promotion gate: ANN recall@10 against exact search.")
    ndcg_margin: float = Field(
        0.02, ge=0, le=1, description="Promotion gate: nDCG@10 may fall at most this far below the active version's."
    )
    queries: str | None = Field(
        None, description="Labelled queries (JSONL: {query, relevant}) for nDCG@10 in eval and the promotion gate."
    )
    shadow_min_overlap: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Promotion gate (off when null): the candidate's overlap@10 with the active answers on live "
        "shadow traffic (serve.shadow) must reach this.",
    )
    shadow_min_queries: int = Field(
        100, ge=1, description="Shadow queries the shadow gate needs; with fewer it refuses: not enough traffic."
    )
    eval_sample: int = Field(200, ge=1, description="Sampled queries for recall@10 and overlap@10.")
    audit_sample: int = Field(200, ge=1, description="Stored rows `embray audit` re-embeds and compares.")
    audit_min_cosine: float = Field(0.999, ge=-1, le=1, description="A re-embedded row below this cosine has drifted.")
    interval_s: float = Field(3600, gt=0, description="Seconds between checks of `jobs/monitor.py`.")


class Config(_Strict):
    collection: str = Field(description="Name of the managed collection (lowercase letters, digits, - and _).")
    source: SourceConfig
    store: StoreConfig = Field(default_factory=StoreConfig)
    model: ModelSpec = Field(default_factory=lambda: ModelSpec())
    index: IndexConfig = Field(default_factory=IndexConfig)
    chunk: ChunkConfig | Literal["none"] | None = Field(
        None,
        description="Passages per document (a mapping, e.g. {tokens: 256, overlap: 32}), 'none' (one vector per "
        "row, truncated), or left out (a refresh keeps its parent's, a backfill the active version's; a new "
        "collection: passages sized to the model's window). Part of the vector space: a change is a migration.",
    )
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, v: str) -> str:
        if not _COLLECTION_RE.match(v):
            raise ValueError(
                f"{v!r} is not a valid collection name: use 1-63 lowercase letters, digits, '-' or '_', "
                "starting with a letter or digit"
            )
        return v

    @property
    def registered_model(self) -> str:
        """The MLflow registered model that tracks this collection's versions."""
        return f"embray.{self.collection}"

    def tracking_uri(self) -> str:
        """The MLflow tracking URI, defaulting to a sqlite file under a local store."""
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        if is_remote(self.store.uri):
            raise ConfigError(
                f"mlflow.tracking_uri: the store {self.store.uri} is remote, so there is no local sqlite default; "
                "set mlflow.tracking_uri to your MLflow server (http://...) or a sqlite:/// path"
            )
        return "sqlite:///" + str(Path(_strip_file(self.store.uri)) / "mlflow.db")

    def experiment_name(self) -> str:
        return self.mlflow.experiment or f"embray/{self.collection}"


def _strip_file(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def _resolve(uri: str, base: Path) -> str:
    if is_remote(uri):
        return uri
    path = Path(os.path.expanduser(_strip_file(uri)))
    return str(path if path.is_absolute() else (base / path).resolve())


def _format_validation_error(e: ValidationError, origin: str) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against the documented keys"
        elif err["type"] == "missing":
            msg = "required key is missing; add it"
        lines.append(f"{where}: {msg}")
    return f"invalid config {origin}: " + "; ".join(lines)


def parse_config(data: Any, *, base_dir: Path | str = ".", origin: str = "(inline)") -> Config:
    """Validate a config mapping; relative local paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {origin}: expected a mapping of keys at the top level")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from e
    base = Path(base_dir)
    return cfg.model_copy(
        update={
            "source": cfg.source.model_copy(update={"uri": _resolve(cfg.source.uri, base)}),
            "store": cfg.store.model_copy(update={"uri": _resolve(cfg.store.uri, base)}),
            "model": cfg.model.resolved(base),
            "monitor": cfg.monitor.model_copy(
                update={"queries": _resolve(cfg.monitor.queries, base) if cfg.monitor.queries else None}
            ),
        }
    )


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a YAML config file."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"config file {p} does not exist; pass --config with the path of your YAML file") from e
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if overrides:
        data = {**(data or {}), **overrides}
    return parse_config(data, base_dir=p.resolve().parent, origin=str(p))


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``storage_options`` safe to print or log: secrets are masked."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(s in k.lower() for s in _SECRET_KEYS):
            out[k] = "***"
        else:
            out[k] = v
    return out


def parse_model_spec(data: Any, *, base_dir: Path | str = ".", origin: str = "(inline)") -> ModelSpec:
    """Validate a model spec mapping (relative model directories resolve against ``base_dir``)."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"model spec {origin} must be a mapping such as {{backend: sentence-transformers, name: ...}}"
        )
    try:
        return ModelSpec.model_validate(data).resolved(Path(base_dir).resolve())
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "model"
        raise ConfigError(f"model spec {origin}: model.{key}: {err['msg']}") from e


def load_model_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """Read a model spec from YAML: the spec itself, or a file with a top-level ``model:`` key."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"model spec file {p} does not exist; pass --model with the path of a YAML file") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"model spec file {p} is not valid YAML: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    return parse_model_spec(data, base_dir=p.parent, origin=f"file {p}")
