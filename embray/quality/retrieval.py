"""Retrieval quality of a version, and the checks built on it.

- ``evaluate``: ANN recall@10 of the version's USearch shards against exact search of the same shards
  (queries: stored vectors of sampled rows); overlap@10 of its results with another version's (queries:
  sampled source texts, each version embedding them with its own model); nDCG@10 and recall@10 on a
  labelled query file. Results go to the version's MLflow run (metrics) and model version (tags).
- ``check_gates``: what ``promote`` requires: verify passes, recall@10 >= ``monitor.recall_floor``, and
  with labelled queries nDCG@10 no more than ``monitor.ndcg_margin`` below the active version's.
- ``audit``: re-embed a sample of stored rows with the version's model and compare with the stored
  vectors, catching weights changed behind the same name, a nondeterministic backend, or tampering.

Labelled queries, one JSON object per line; ``relevant`` is a list of ids (grade 1) or ``{id: grade}``::

    {"query": "how do I parse a date", "relevant": ["doc-17", "doc-940"]}
    {"query": "invoice totals", "relevant": ["doc-3"], "filter": {"tenant": "acme"}}

A line's optional ``filter`` (:mod:`embray.filters`) restricts its search as a user's request would, and its
optional ``mode`` (vector, keyword, hybrid) searches as that mode does.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embray.config import Config
from embray.context import Context
from embray.errors import ConfigError, EmbrayError, QueryError, SourceError, VersionError
from embray.lifecycle.registry import ACTIVE, CANDIDATE
from embray.lifecycle.verify import problems as verify_problems
from embray.lifecycle.versions import Manifest, read_manifest
from embray.models import fingerprint, load_embedder
from embray.quality.shadow import read_shadow
from embray.results import AuditReport, EvalReport, Gate, GateReport, Hit
from embray.search import VersionIndex
from embray.storage import rows as R
from embray.storage.segments import ShardFiles, live_mask, live_rows
from embray.storage.store import Store, list_source_files
from embray.storage.vectors import to_numpy

log = logging.getLogger("embray")

K = 10
SCORE_EPS = 1e-5  # exact-score ties: a result as good as the exact k-th counts as found


@dataclass(frozen=True)
class LabelledQuery:
    text: str
    relevant: dict[Any, float]  # id -> grade (> 0)
    filter: dict | None = None  # the metadata filter the query is asked with
    line: int = 0  # its line in the file
    mode: str = "vector"  # the search mode it is asked in


def search_labelled(vi: VersionIndex, labelled: list[LabelledQuery], k: int = K) -> list[list[Hit]]:
    """Each labelled query's top k from ``vi``, asked with its own filter and mode (queries sharing both, in one
    batch)."""
    out: list[list[Hit] | None] = [None] * len(labelled)
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(labelled):
        groups.setdefault(json.dumps([q.filter, q.mode], sort_keys=True), []).append(i)
    for members in groups.values():
        first = labelled[members[0]]
        try:
            vi.check_query(filter=first.filter)
            vi.check_mode(first.mode)
        except QueryError as e:
            raise QueryError(f"labelled query on line {first.line}: {e}") from e
        texts = [labelled[i].text for i in members]
        for i, hits in zip(members, vi.search_text(texts, k, filter=first.filter, mode=first.mode), strict=True):
            out[i] = hits
    return out


def load_queries(path: str | Path) -> list[LabelledQuery]:
    """Read a labelled query file; every malformed line is named with its number."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except FileNotFoundError as e:
        raise ConfigError(f"labelled query file {p} does not exist; set monitor.queries or --queries") from e
    except OSError as e:
        raise ConfigError(f"labelled query file {p} cannot be read: {e.strerror or e}") from e
    out: list[LabelledQuery] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text, rel = obj["query"], obj["relevant"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f'{p}:{n}: expected a JSON object {{"query": "...", "relevant": [ids]}} ({type(e).__name__}: {e})'
            ) from e
        try:
            grades = {i: 1.0 for i in rel} if isinstance(rel, list) else {i: float(g) for i, g in rel.items()}
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(
                f"{p}:{n}: 'relevant' must be a list of ids or a mapping of id to a numeric grade ({e})"
            ) from e
        grades = {i: g for i, g in grades.items() if g > 0}
        if not isinstance(text, str) or not text.strip() or not grades:
            raise ConfigError(
                f"{p}:{n}: 'query' must be non-empty text and 'relevant' name at least one id with a grade above 0"
            )
        flt = obj.get("filter")
        if flt is not None and not isinstance(flt, dict):
            raise ConfigError(f'{p}:{n}: \'filter\' must be a JSON object such as {{"tenant": "acme"}}')
        mode = obj.get("mode", "vector")
        if not isinstance(mode, str):
            raise ConfigError(f"{p}:{n}: 'mode' must be vector, keyword or hybrid")
        out.append(LabelledQuery(text, grades, flt or None, n, mode))
    if not out:
        raise ConfigError(f"labelled query file {p} has no queries")
    return out


# --- measures ----------------------------------------------------------------------------


def _sample_keys(vi: VersionIndex, n: int, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
    """(shard position, keys) of about ``n`` stored rows, spread over shards by size."""
    live = [p.keys[live_mask(p.keys, p.dead)] for p in vi.shards]  # a part's keys less tombstones
    sizes = np.array([len(keys) for keys in live], dtype=float)
    if not sizes.sum():
        return []
    picks = rng.choice(len(sizes), size=min(n, int(sizes.sum())), p=sizes / sizes.sum())
    out = []
    for pos, keys in enumerate(live):
        take = int((picks == pos).sum())
        if take:
            out.append((pos, rng.choice(keys, size=min(take, len(keys)), replace=False)))
    return out


def ann_recall(vi: VersionIndex, sample: int, *, k: int = K, seed: int = 0) -> tuple[float, int]:
    """Mean recall@k of the HNSW search against exact search over the same shards, and the query count.

    Queries are the stored vectors of sampled rows. A result counts as found when it is in the exact
    top k or scores at least as well as the exact k-th (so exact ties do not count as misses).
    """
    rng = np.random.default_rng(seed)
    parts = [
        np.asarray(vi.shards[pos].index.get(keys, dtype=np.float32)) for pos, keys in _sample_keys(vi, sample, rng)
    ]
    if not parts:
        return 1.0, 0
    q = np.vstack(parts)
    ann = vi.search_vectors(q, k, chunks=True)  # (a chunked version's graph holds passages: compared as such)
    exact = vi.search_vectors(q, k, exact=True, chunks=True)
    found = []
    for a, e in zip(ann, exact, strict=True):
        if not e:
            continue
        ids, kth = {h.id for h in e}, e[-1].score
        found.append(sum(1 for h in a if h.id in ids or h.score >= kth - SCORE_EPS) / len(e))
    return float(np.mean(found)) if found else 1.0, len(q)


def overlap(a: list[list[Hit]], b: list[list[Hit]]) -> float:
    """Mean share of result ids two versions have in common, query by query."""
    shares = [len({h.id for h in x} & {h.id for h in y}) / max(len(x), len(y)) for x, y in zip(a, b, strict=True) if x]
    return float(np.mean(shares)) if shares else 1.0


def ndcg_recall(results: list[list[Hit]], queries: list[LabelledQuery], k: int = K) -> tuple[float, float]:
    """(mean nDCG@k, mean recall@k) against the labels; gain is the grade, discount log2(rank + 1)."""
    ndcgs, recalls = [], []
    for hits, q in zip(results, queries, strict=True):
        rel = {str(i): g for i, g in q.relevant.items()}
        dcg = sum(rel.get(str(h.id), 0.0) / math.log2(r + 2) for r, h in enumerate(hits[:k]))
        ideal = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(rel.values(), reverse=True)[:k]))
        ndcgs.append(dcg / ideal if ideal else 0.0)
        recalls.append(len({str(h.id) for h in hits[:k]} & set(rel)) / len(rel))
    return float(np.mean(ndcgs)), float(np.mean(recalls))


def sample_texts(cfg: Config, n: int, *, seed: int = 0) -> list[str]:
    """Up to ``n`` distinct texts from the source corpus, read from files in a random order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store, files = list_source_files(cfg.source.uri, cfg.source.storage_options)
    rng = random.Random(seed)
    files = rng.sample(files, len(files))
    seen: set[str] = set()
    for path in files:
        try:
            col = pq.read_table(path, columns=[cfg.source.text_column], filesystem=store.pyarrow_fs()).column(0)
        except (OSError, pa.ArrowException) as e:
            raise SourceError(f"cannot read the text column of {path}: {e}; check source.text_column") from e
        seen.update(t for t in col.to_pylist() if isinstance(t, str) and t.strip())
        if len(seen) >= 4 * n:
            break
    return rng.sample(sorted(seen), min(n, len(seen)))


# --- eval ---------------------------------------------------------------------------------


def _open(ctx: Context, version: str) -> VersionIndex:
    return VersionIndex(ctx.store, read_manifest(ctx.store, ctx.collection, version))


def evaluate(
    ctx: Context,
    version: str,
    *,
    against: str | None = None,
    queries: str | None = None,
    sample: int | None = None,
    record: bool = True,
) -> EvalReport:
    """Measure a version (see the module doc); ``record`` logs the results to its MLflow run and tags."""
    t0 = time.monotonic()
    cfg = ctx.cfg
    vi = _open(ctx, version)
    n = sample or cfg.monitor.eval_sample
    recall, measured = ann_recall(vi, n)
    extra: dict[str, Any] = {}
    if against:
        other = _open(ctx, against)
        texts = sample_texts(cfg, n)
        extra.update(
            against=against,
            overlap_at_10=round(overlap(vi.search_text(texts, K), other.search_text(texts, K)), 4),
            overlap_queries=len(texts),
        )
    qpath = queries or cfg.monitor.queries
    if qpath:
        labelled = load_queries(qpath)
        ndcg, rec = ndcg_recall(search_labelled(vi, labelled), labelled)
        extra.update(
            ndcg_at_10=round(ndcg, 4),
            labelled_recall_at_10=round(rec, 4),
            labelled_queries=len(labelled),
            queries_file=str(qpath),
        )
    out = EvalReport(
        version=version,
        fingerprint=vi.fingerprint,
        rows=vi.manifest.rows,
        recall_at_10=round(recall, 4),
        recall_queries=measured,
        seconds=round(time.monotonic() - t0, 3),
        **extra,
    )
    if record:
        _record(ctx, vi.manifest.mlflow_run_id, version, "eval", out.numbers())
    return out


def result_tags(prefix: str, numbers: dict[str, float]) -> dict[str, str]:
    """Measured numbers as model version tags (``embray.eval.recall_at_10``...)."""
    return {f"embray.{prefix}.{k}": str(v) for k, v in numbers.items()}


def log_result(ctx: Context, run_id: str | None, prefix: str, numbers: dict[str, float]) -> None:
    """Measured numbers as metrics of the version's MLflow run (one point per measurement)."""
    if run_id:
        ctx.registry.log_metrics(run_id, {f"{prefix}.{k}": float(v) for k, v in numbers.items()})


def _record(ctx: Context, run_id: str | None, version: str, prefix: str, numbers: dict[str, float]) -> None:
    """Numbers to the version's MLflow run as metrics, and to its model version as tags."""
    log_result(ctx, run_id, prefix, numbers)
    try:
        ctx.registry.tag_version(version, result_tags(prefix, numbers))
    except VersionError as e:  # not registered yet (crash before register): the run still has it
        log.warning("%s results of %s not tagged: %s", prefix, version, e)


# --- gates --------------------------------------------------------------------------------


def _ndcg_gate(ctx: Context, version: str, result: EvalReport, queries: str | None) -> Gate | None:
    """nDCG@10 no more than ``monitor.ndcg_margin`` below the active version's (labelled queries only)."""
    active = ctx.registry.aliases().get(ACTIVE)
    if result.ndcg_at_10 is None or not active or active == version:
        return None
    margin = ctx.cfg.monitor.ndcg_margin
    try:
        base = evaluate(ctx, active, queries=queries, record=False).ndcg_at_10
    except EmbrayError as e:  # the active version cannot be measured here: the gate fails, --force can pass it
        return Gate(
            "ndcg_at_10",
            False,
            f"nDCG@10 {result.ndcg_at_10}, but the active version {active} cannot be measured to compare: {e}",
            value=result.ndcg_at_10,
        )
    floor = round(base - margin, 4)
    return Gate(
        "ndcg_at_10",
        result.ndcg_at_10 >= floor,
        f"nDCG@10 {result.ndcg_at_10} vs active {active} {base} - margin {margin} "
        f"({result.labelled_queries} labelled queries)",
        value=result.ndcg_at_10,
        threshold=floor,
    )


def check_gates(ctx: Context, version: str, *, queries: str | None = None) -> GateReport:
    """Run every promotion gate on ``version``: verify, ANN recall@10, and (with labelled queries) nDCG@10."""
    found = verify_problems(ctx.store, ctx.collection, version)
    gates = [Gate("verify", not found, "; ".join(found[:5]) if found else "sound")]
    if found:  # the other gates read the files verify found wrong
        return GateReport(version, False, gates)
    floor = ctx.cfg.monitor.recall_floor
    result = evaluate(ctx, version, queries=queries, record=False)  # promote records it under the alias lease
    gates.append(
        Gate(
            "recall_at_10",
            result.recall_at_10 >= floor,
            f"ANN recall@10 {result.recall_at_10} vs floor {floor} ({result.recall_queries} queries)",
            value=result.recall_at_10,
            threshold=floor,
        )
    )
    ndcg = _ndcg_gate(ctx, version, result, queries)
    if ndcg is not None:
        gates.append(ndcg)
    shadow = _shadow_gate(ctx, version)
    if shadow is not None:
        gates.append(shadow)
    return GateReport(version, all(g.passed for g in gates), gates, result)


def _shadow_gate(ctx: Context, version: str) -> Gate | None:
    """monitor.shadow_min_overlap: the version's overlap@10 with the active answers on live shadow traffic."""
    mon = ctx.cfg.monitor
    floor = mon.shadow_min_overlap
    if floor is None or ctx.registry.aliases().get(CANDIDATE) != version:
        return None  # only a candidate gets shadow traffic (a refresh of the active model is not one)
    stats = read_shadow(ctx.store, ctx.collection, version)
    if stats is None or stats.queries < mon.shadow_min_queries:
        n = stats.queries if stats else 0
        why = (
            f"not enough shadow traffic: {n} of the {mon.shadow_min_queries} live queries monitor.shadow_min_queries "
            "asks for (serve.shadow.fraction sends them while the version is candidate)"
        )
        return Gate("shadow_overlap_at_10", False, why, stats.overlap_at_10 if stats else None, floor)
    detail = (
        f"live overlap@10 with the active answers {stats.overlap_at_10} vs floor {floor} ({stats.queries} shadow "
        f"queries; candidate p50 {stats.p50_ms} ms, p99 {stats.p99_ms} ms)"
    )
    return Gate("shadow_overlap_at_10", stats.overlap_at_10 >= floor, detail, stats.overlap_at_10, floor)


# --- drift audit ----------------------------------------------------------------------------


def _stored_sample(store: Store, manifest: Manifest, n: int, rng: random.Random) -> dict[Any, tuple]:
    """id -> (content_hash, stored vector, span) for about ``n`` rows spread over the shards by size; a chunked
    version's span is (document id, start, end) of the passage, else None."""
    import pyarrow.parquet as pq

    shards = [s for s in manifest.shards if s.rows and s.embeddings]
    total = sum(s.rows for s in shards)
    out: dict[Any, tuple] = {}
    spans = ["doc", "start", "end"] if manifest.chunk else []
    for s in shards:
        take = min(s.rows, max(1, round(n * s.rows / total)))
        files = ShardFiles.of(manifest, s)
        live = live_rows(store, files, ["id", "key"])  # base + segments - tombstones
        by_id = dict(zip(live.column("id").to_pylist(), live.column("key").to_pylist(), strict=True))
        keys = [by_id[i] for i in rng.sample(list(by_id), take)]
        for rel in files.parts:
            t = pq.read_table(
                store.path(rel),
                columns=["id", "content_hash", "vector", *spans],
                filesystem=store.pyarrow_fs(),
                filters=[("key", "in", keys)],
            )
            vecs = to_numpy(t.column("vector"), manifest.dims)
            where = list(zip(*(t.column(c).to_pylist() for c in spans), strict=True)) if spans else [None] * len(vecs)
            ids, hashes = t.column("id").to_pylist(), t.column("content_hash").to_pylist()
            for i, h, v, span in zip(ids, hashes, vecs, where, strict=True):
                out[i] = (h, v, span)
    return out


def _source_texts(cfg: Config, ids: list[Any]) -> dict[Any, str]:
    """The current source text of each of ``ids`` that still exists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sc = cfg.source
    store, files = list_source_files(sc.uri, sc.storage_options)
    out: dict[Any, str] = {}
    for path in files:
        try:
            t = pq.read_table(
                path,
                columns=[sc.id_column, sc.text_column],
                filesystem=store.pyarrow_fs(),
                filters=[(sc.id_column, "in", ids)],
            )
        except (OSError, pa.ArrowException) as e:
            raise SourceError(
                f"cannot look up the sampled ids in {path}: {e}; the source's id column must keep the type "
                "it had when the version was built"
            ) from e
        out.update(zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True))
    return out


def _stored_texts(cfg: Config, stored: dict[Any, tuple]) -> dict[Any, str]:
    """The current source text of each sampled row (a passage: its span of its document's current text)."""
    if all(span is None for _, _, span in stored.values()):
        return _source_texts(cfg, list(stored))
    docs = _source_texts(cfg, sorted({span[0] for _, _, span in stored.values()}, key=str))
    out = {}
    for i, (_, _, (doc, start, end)) in stored.items():
        if isinstance(docs.get(doc), str):
            out[i] = docs[doc][start:end]
    return out


def audit(
    ctx: Context,
    version: str,
    *,
    sample: int | None = None,
    min_cosine: float | None = None,
    seed: int | None = None,
) -> AuditReport:
    """Re-embed a random sample of a version's rows with its model; compare with the stored vectors.

    Rows whose source text changed since the version was built (or that left the source) cannot be
    compared and are counted apart. ``ok`` is false when any compared row falls below ``min_cosine``,
    or when the model here no longer has the version's fingerprint.
    """
    t0 = time.monotonic()
    cfg = ctx.cfg
    m = read_manifest(ctx.store, ctx.collection, version)
    floor = cfg.monitor.audit_min_cosine if min_cosine is None else min_cosine
    rng = random.Random(seed if seed is not None else time.time_ns())
    stored = _stored_sample(ctx.store, m, sample or cfg.monitor.audit_sample, rng)
    texts = _stored_texts(cfg, stored)
    usable = [i for i in stored if isinstance(texts.get(i), str) and R.content_hash(texts[i]) == stored[i][0]]
    here = fingerprint(m.model)
    problems = []
    if here != m.fingerprint:
        problems.append(
            f"the model {m.model.label} here has fingerprint {here}, the version {m.fingerprint}: "
            "its weights or spec changed"
        )
    cos = np.zeros(0)
    if usable:
        fresh = load_embedder(m.model).embed_documents([texts[i] for i in usable])
        old = np.vstack([stored[i][1] for i in usable])
        num = np.sum(fresh * old, axis=1)
        cos = num / np.maximum(np.linalg.norm(fresh, axis=1) * np.linalg.norm(old, axis=1), 1e-12)
    drifted = [(float(c), i) for c, i in zip(cos, usable, strict=True) if c < floor]
    if drifted:
        problems.append(f"{len(drifted)} of {len(usable)} re-embedded rows are below cosine {floor}")
    if not usable:
        problems.append("no sampled row still has its source text, so nothing could be compared")
    out = AuditReport(
        version=version,
        fingerprint=m.fingerprint,
        fingerprint_here=here,
        sampled=len(stored),
        compared=len(usable),
        source_changed=sum(1 for i in stored if isinstance(texts.get(i), str)) - len(usable),
        source_missing=sum(1 for i in stored if not isinstance(texts.get(i), str)),
        min_cosine=round(float(cos.min()), 6) if len(cos) else None,
        mean_cosine=round(float(cos.mean()), 6) if len(cos) else None,
        threshold=floor,
        drifted=len(drifted),
        worst=[{"id": i, "cosine": round(c, 6)} for c, i in sorted(drifted, key=lambda p: p[0])[:10]],
        ok=not problems,
        problems=problems,
        seconds=round(time.monotonic() - t0, 3),
    )
    numbers = {"compared": out.compared, "drifted": out.drifted}
    if out.min_cosine is not None:
        numbers["min_cosine"] = out.min_cosine
    _record(ctx, m.mlflow_run_id, version, "audit", numbers)
    return out
