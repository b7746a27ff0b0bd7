"""Metadata columns (`source.columns`) and texts (`source.store_text`) kept in a version beside its vectors, on a
real local Ray, local disk and sqlite MLflow ('hash' model): their kinds, what `dataset()` and hits give back,
refreshes that change only metadata (nothing embedded; delta segments, tombstones, compaction), chunked
documents' passages carrying their document's columns, filters answered from the version's own metadata and
exactly equal to the matching rows, the CLI and eval, and every refusal naming its fix."""

from __future__ import annotations

import datetime as dt
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embray import Collection
from embray.cli import main
from embray.errors import ConfigError, QueryError, SourceError
from embray.filters import parse_filter
from embray.lifecycle.versions import read_manifest
from embray.storage import metadata as M
from embray.storage.store import Store

from .helpers import doc_text, filter_trees, make_config

pytestmark = pytest.mark.usefixtures("ray_local")

COLUMNS = ["tenant", "n", "price", "public", "published", "day", "tags", "label"]
KINDS = {
    "tenant": "string",
    "n": "int64",
    "price": "float64",
    "public": "bool",
    "published": "timestamp",
    "day": "date",
    "tags": "list<string>",
    "label": "string",
}
T0 = dt.datetime(2026, 1, 1)


def meta_row(i: int, rev: int = 0) -> dict:
    """Row i's metadata (``rev`` shifts the tenant: a metadata-only change); every column has some nulls."""
    return {
        "tenant": ["acme", "globex", "initech"][(i + rev) % 3],
        "n": i if i % 11 else None,
        "price": round(i * 0.5, 1) if i % 13 else None,
        "public": (i % 2 == 0) if i % 7 else None,
        "published": T0 + dt.timedelta(hours=i) if i % 9 else None,
        "day": (T0 + dt.timedelta(days=i)).date() if i % 10 else None,
        "tags": [["red"], ["red", "blue"], [], None][i % 4],
        "label": f"L{i % 5}" if i % 6 else None,
    }


def write_meta(root, rows: dict[str, tuple[str, dict]], files: int = 2) -> None:
    """Rewrite the corpus: id, text and the metadata columns, in source widths (int32, float32, ms timestamps,
    a dictionary-encoded string) that the version keeps in its own kinds."""
    for old in root.glob("*.parquet"):
        old.unlink()
    root.mkdir(parents=True, exist_ok=True)
    items = sorted(rows.items())
    for f in range(files):
        part = items[f::files]
        col = {c: [m[c] for _, (_, m) in part] for c in COLUMNS}
        table = pa.table(
            {
                "id": [i for i, _ in part],
                "text": [t for _, (t, _) in part],
                "tenant": pa.array(col["tenant"]).dictionary_encode(),
                "n": pa.array(col["n"], pa.int32()),
                "price": pa.array(col["price"], pa.float32()),
                "public": pa.array(col["public"], pa.bool_()),
                "published": pa.array(col["published"], pa.timestamp("ms")),
                "day": pa.array(col["day"], pa.date32()),
                "tags": pa.array(col["tags"], pa.list_(pa.string())),
                "label": pa.array(col["label"], pa.large_string()),
            }
        )
        pq.write_table(table, root / f"part-{f:05d}.parquet")


def corpus(n: int = 240, rev: int = 0) -> dict[str, tuple[str, dict]]:
    return {f"doc-{i:04d}": (doc_text(i), meta_row(i, rev)) for i in range(n)}


def expected_table(rows: dict[str, tuple[str, dict]]):
    """The metadata of ``rows`` as the version keeps it (its kinds), in id order, with the ids."""
    ids = sorted(rows)
    cols = {"id": pa.array(ids)}
    for c, kind in KINDS.items():
        vals = [rows[i][1][c] for i in ids]
        if kind == "timestamp":
            vals = [v.replace(tzinfo=dt.UTC) if v else None for v in vals]
        if kind == "float64":
            vals = [float(np.float32(v)) if v is not None else None for v in vals]  # written as float32
        cols[c] = pa.array(vals, M.arrow_type(kind))
    return pa.table(cols)


def matching(rows, spec) -> set[str]:
    """Ids whose metadata matches ``spec``, by the filter applied to the corpus itself (not the version)."""
    t = expected_table(rows)
    mask = parse_filter(spec, M.schema(KINDS)).mask(t)
    return set(np.asarray(t.column("id").to_pylist())[mask])


def config(tmp_path, **over):
    source = {"columns": COLUMNS, "store_text": True, **over.pop("source", {})}
    return make_config(tmp_path, source=source, index={"max_delta_fraction": 0.3}, **over)


def live_meta(col: Collection, version: str) -> dict:
    """id -> {column: value, ..., text} as `dataset()` reads the version."""
    rows = col.dataset(version).to_pandas()
    return {r["id"]: {c: r[c] for c in [*COLUMNS, "text"]} for r in rows.to_dict("records")}


FILTERS = [
    {"tenant": "acme"},
    {"tenant": {"$in": ["acme", "initech"]}, "n": {"$lt": 100}},
    {"price": {"$gte": 40.5}},
    {"public": True},
    {"published": {"$gte": "2026-01-03T00:00:00Z"}},
    {"day": {"$lt": "2026-02-01"}},
    {"tags": "blue"},
    {"tags": {"$nin": ["red"]}},
    {"label": {"$exists": False}},
    {"$or": [{"n": {"$gt": 230}}, {"label": "L3"}]},
    {"$not": {"tenant": "globex"}},
    {"n": {"$gt": 10_000}},  # none
]


def test_columns_are_kept_in_their_kinds_filtered_exactly_and_returned_as_fields(tmp_path):
    rows = corpus()
    write_meta(tmp_path / "corpus", rows)
    cfg = config(tmp_path)
    col = Collection(cfg)
    built = col.backfill()
    m = read_manifest(Store(cfg.store.uri), "docs", built.version)
    assert m.source.columns == KINDS and m.source.store_text is True
    assert json.loads(m.to_json())["source"]["columns"] == KINDS
    (info,) = col.versions()
    assert info.columns == KINDS and info.keywords is False and info.to_dict()["columns"] == KINDS

    got = live_meta(col, built.version)  # dataset(): every row's columns under their own names, and its text
    want = expected_table(rows).to_pylist()
    assert len(got) == len(rows)
    for w in want:
        g = got[w["id"]]
        assert g["text"] == rows[w["id"]][0]
        for c in COLUMNS:
            v = g[c]
            v = list(v) if isinstance(v, np.ndarray) else v
            if hasattr(v, "to_pydatetime"):
                v = v.to_pydatetime()
            assert v == w[c] or (v != v and w[c] is None) or (v is None and w[c] is None), (w["id"], c, v, w[c])

    query = doc_text(17)
    for spec in FILTERS:  # k above every match: the hits are exactly the matching rows
        hits = col.search(query, k=1000, filter=spec, fields=["tenant", "n"]).results
        assert {h.id for h in hits} == matching(rows, spec), spec
        top = col.search(query, k=5, filter=spec).results
        exact = col.index().search_vectors(col.index().embedder.embed_queries([query]), 5, exact=True, filter=spec)
        assert [h.score for h in top] == pytest.approx([h.score for h in exact[0]], abs=1e-3), spec
    hit = col.search(query, k=1, fields=["published", "day", "tags", "text"]).results[0]
    i = int(hit.id[4:])
    assert hit.id == "doc-0017" and hit.fields["text"] == rows[hit.id][0]
    assert hit.fields["published"] == T0.replace(tzinfo=dt.UTC) + dt.timedelta(hours=i)
    d = hit.to_dict()["fields"]
    assert d["published"] == "2026-01-01T17:00:00+00:00" and d["day"] == "2026-01-18" and d["tags"] == ["red", "blue"]
    many = col.search_many([query, doc_text(30)], k=3, filter={"tenant": "acme"}, fields=["tenant"])
    assert all(h.fields == {"tenant": "acme"} for r in many for h in r.results)


def test_a_metadata_change_is_a_refresh_that_embeds_nothing(tmp_path):
    rows = corpus()
    write_meta(tmp_path / "corpus", rows)
    cfg = config(tmp_path)
    col = Collection(cfg)
    v1 = col.backfill(promote=True).version
    changed = dict(rows)
    moved = [f"doc-{i:04d}" for i in range(0, 240, 24)]  # 10 rows change tenant only
    for i in moved:
        changed[i] = (rows[i][0], {**rows[i][1], "tenant": "umbrella"})
    changed["doc-0005"] = (rows["doc-0005"][0] + " revised", rows["doc-0005"][1])  # and one text
    write_meta(tmp_path / "corpus", changed)
    r = col.refresh(promote=True)
    assert (r.counts.changed, r.counts.embedded, r.counts.new, r.counts.deleted) == (11, 1, 0, 0)
    assert r.manifest.counts["shards_delta"] == 3  # new rows in delta segments, old ones tombstoned
    assert {h.id for h in col.search("x", k=100, filter={"tenant": "umbrella"}).results} == set(moved)
    assert not col.search("x", k=100, version=v1, filter={"tenant": "umbrella"}).results  # v1 is as it was
    fresh_cfg = make_config(
        tmp_path / "fresh", source={"uri": str(tmp_path / "corpus"), "columns": COLUMNS, "store_text": True}
    )
    fresh = Collection(fresh_cfg)
    fresh_v = fresh.backfill().version
    assert _normal(live_meta(col, r.version)) == _normal(live_meta(fresh, fresh_v))
    compacted = col.compact(promote=True)
    assert compacted.counts.embedded == 0
    assert _normal(live_meta(col, compacted.version)) == _normal(live_meta(fresh, fresh_v))
    for spec in FILTERS:
        assert {h.id for h in col.search("river", k=1000, filter=spec).results} == matching(changed, spec), spec

    # Another set of kept columns (or texts no longer kept): every row is a changed row, none embedded.
    fewer = col.config.model_copy(
        update={"source": col.config.source.model_copy(update={"columns": ["tenant"], "store_text": False})}
    )
    r = Collection(fewer).refresh()
    assert (r.counts.changed, r.counts.embedded) == (240, 0)
    assert r.manifest.source.columns == {"tenant": "string"} and not r.manifest.source.store_text
    with pytest.raises(QueryError, match="unknown column 'n'.*tenant"):
        Collection(fewer).search("x", version=r.version, filter={"n": 1})
    with pytest.raises(QueryError, match="unknown field 'text'"):
        Collection(fewer).search("x", version=r.version, fields=["text"])


def _normal(meta: dict) -> dict:
    """Comparable values (numpy arrays as lists, NaN/NaT as None)."""
    out = {}
    for i, row in meta.items():
        out[i] = {}
        for c, v in row.items():
            v = list(v) if isinstance(v, np.ndarray) else v
            out[i][c] = None if v is None or (not isinstance(v, list) and v != v) else v
    return out


def test_passages_carry_their_document_columns(tmp_path):
    rng = random.Random(3)
    words = "alpha beta gamma delta river stone cloud ember falcon canyon".split()
    rows = {
        f"doc-{i:03d}": (" ".join(rng.choice(words) for _ in range(rng.randint(20, 160))), meta_row(i))
        for i in range(40)
    }
    write_meta(tmp_path / "corpus", rows)
    cfg = config(tmp_path, chunk={"tokens": 32, "overlap": 4})
    col = Collection(cfg)
    v = col.backfill().version
    ds = col.dataset(v).to_pandas()
    assert len(ds) > len(rows)  # several passages per long document
    for r in ds.to_dict("records"):
        text, meta = rows[r["doc"]]
        assert r["tenant"] == meta["tenant"] and r["text"] == text[r["start"] : r["end"]]
    hits = col.search("river stone", k=1000, filter={"tenant": "acme"}, fields=["tenant", "text"]).results
    assert {h.id for h in hits} == {i for i, (_, m) in rows.items() if m["tenant"] == "acme"}
    for h in hits:  # a document hit: its best passage's text
        assert h.fields["text"] == rows[h.id][0][h.chunk.start : h.chunk.end]


def test_bad_columns_and_queries_are_refused_naming_the_fix(tmp_path, capsys):
    for columns, needle in (
        (["id"], "is the id column"),
        (["text"], "source.store_text"),
        (["tenant", "tenant"], "twice"),
        (["vector"], "rename the column"),
        (["$x"], "not a column name"),
    ):
        with pytest.raises(ConfigError, match=needle):
            make_config(tmp_path, source={"columns": columns})

    rows = corpus(30)
    write_meta(tmp_path / "corpus", rows)
    with pytest.raises(SourceError, match="no column 'region'.*source.columns"):
        Collection(make_config(tmp_path, source={"columns": ["region"]})).backfill()
    pq.write_table(
        pa.table({"id": ["x1"], "text": ["a b"], "tenant": pa.array([7], pa.int64())}),
        tmp_path / "corpus" / "zz.parquet",
    )
    with pytest.raises(SourceError, match="'tenant'.*int64 in some files and string in others"):
        Collection(make_config(tmp_path, source={"columns": ["tenant"]})).backfill()
    (tmp_path / "other").mkdir()
    pq.write_table(
        pa.table({"id": ["x1"], "text": ["a b"], "blob": pa.array([{"a": 1}])}), tmp_path / "other" / "a.parquet"
    )
    with pytest.raises(SourceError, match="'blob'.*struct.*convert it or remove it"):
        Collection(make_config(tmp_path, source={"uri": str(tmp_path / "other"), "columns": ["blob"]})).backfill()

    (tmp_path / "corpus" / "zz.parquet").unlink()
    cfg = config(tmp_path)
    col = Collection(cfg)
    col.backfill(promote=True)
    with pytest.raises(QueryError, match="unknown column 'tenat'"):
        col.search("x", filter={"tenat": "acme"})
    with pytest.raises(QueryError, match="unknown field .title.; version .* keeps: .*tenant"):
        col.search("x", fields=["title"])
    assert col.search("x", filter={"n": {"$gt": 10_000}}).results == []  # nothing matches: no hits, no error

    cfg_path = tmp_path / "embray.yaml"
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))

    def run(*args: str) -> tuple[int, str]:
        try:
            main(["search", "--config", str(cfg_path), "river", *args])
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out + out.err

    code, out = run("--filter", '{"tenant": "globex"}', "--fields", "tenant,n")
    assert code == 0 and "tenant: 'globex'" in out, out
    code, out = run("-k", "3", "--filter", '{"public": true}', "--fields", "n", "--json")
    doc = json.loads(out)
    assert len(doc["results"]) == 3 and all(set(h["fields"]) == {"n"} for h in doc["results"])
    code, out = run("--filter", '{"tenant": {"$regex": "a"}}')
    assert code == 2 and "$regex" in out
    code, out = run("--filter", "{tenant")
    assert code == 2 and "filter" in out

    queries = tmp_path / "queries.jsonl"  # eval: a labelled query may carry the filter it is asked with
    queries.write_text(
        json.dumps({"query": rows["doc-0003"][0], "relevant": ["doc-0003"], "filter": {"tenant": "acme"}})
        + "\n"
        + json.dumps({"query": rows["doc-0004"][0], "relevant": ["doc-0004"], "filter": {"tenant": "acme"}})
        + "\n"
    )
    report = col.eval("active", queries=str(queries))
    assert report.labelled_recall_at_10 == pytest.approx(0.5)  # doc-0004 is globex's: filtered out
    queries.write_text(json.dumps({"query": "x", "relevant": ["doc-0003"], "filter": {"nope": 1}}) + "\n")
    with pytest.raises(QueryError, match="line 1.*unknown column 'nope'"):
        col.eval("active", queries=str(queries))


def _conditions():
    """A hypothesis strategy of filters over the corpus's columns, from the whole grammar."""
    from hypothesis import strategies as st

    when = st.integers(0, 260).map(lambda h: (T0 + dt.timedelta(hours=h)).isoformat() + "Z")
    day = st.integers(0, 260).map(lambda d: (T0 + dt.timedelta(days=d)).date().isoformat())
    values = {
        "tenant": st.sampled_from(["acme", "globex", "initech", "none"]),
        "n": st.integers(-5, 260),
        "price": st.floats(-1, 130, allow_nan=False).map(lambda x: round(x, 1)),
        "public": st.booleans(),
        "published": when,
        "day": day,
        "tags": st.sampled_from(["red", "blue", "green"]),
        "label": st.sampled_from([f"L{i}" for i in range(6)]),
    }
    ordered = ["n", "price", "published", "day", "tenant", "label"]

    def leaf(col: str):
        v = values[col]
        ops = [v, v.map(lambda x: {"$eq": x}), v.map(lambda x: {"$ne": x})]
        ops += [st.lists(v, max_size=3).map(lambda xs, op=op: {op: xs}) for op in ("$in", "$nin")]
        ops.append(st.booleans().map(lambda b: {"$exists": b}))
        if col in ordered:
            ops += [v.map(lambda x, op=op: {op: x}) for op in ("$gt", "$gte", "$lt", "$lte")]
        if col in ("tags", "tenant"):
            ops.append(v.map(lambda x: {"$contains": x[:2] if col == "tenant" else x}))
        return st.one_of(ops).map(lambda cond: {col: cond})

    return filter_trees(st.sampled_from(COLUMNS).flatmap(leaf))


def test_any_filter_answers_exactly_its_matching_rows_through_segments(tmp_path):
    """Property: over a segmented version (a refresh changed metadata and texts), any filter the grammar
    makes answers exactly the corpus rows it matches (k above them all), and its top 5 scores are exact
    filtered search's."""
    from hypothesis import HealthCheck, given, settings

    rows = corpus()
    write_meta(tmp_path / "corpus", rows)
    col = Collection(config(tmp_path))
    col.backfill(promote=True)
    changed = {
        i: (t + (" revised" if n % 17 == 0 else ""), meta_row(n, rev=1 if n % 11 == 0 else 0))
        for n, (i, (t, _)) in enumerate(sorted(rows.items()))
        if n % 23
    }
    write_meta(tmp_path / "corpus", changed)
    r = col.refresh(promote=True)
    assert r.manifest.counts["shards_delta"] == 3
    index = col.index()
    q = index.embedder.embed_queries([doc_text(17)])

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(spec=_conditions())
    def check(spec):
        hits = index.search_vectors(q, 1000, filter=spec)[0]
        assert {h.id for h in hits} == matching(changed, spec), spec
        top = [h.score for h in index.search_vectors(q, 5, filter=spec)[0]]
        exact = [h.score for h in index.search_vectors(q, 5, filter=spec, exact=True)[0]]
        assert top == pytest.approx(exact, abs=1e-3), spec

    check()
