"""Keyword (BM25) and hybrid search (`index.keywords`, `mode`), on a real local Ray, local disk and sqlite
MLflow ('hash' model): the keyword index is a file of each part like its USearch index (checksummed,
verified, carried by refresh through delta segments and tombstones, rebuilt by compaction), a keyword hit
is a live row of the version that was asked (never a deleted or replaced one), filters restrict keyword and
hybrid answers as they do vector ones, hybrid is the reciprocal rank fusion of the two answers, and what a
version cannot answer is refused naming the fix."""

from __future__ import annotations

import json

import pytest

from embray import Collection
from embray.errors import QueryError
from embray.keywords import fuse_rrf, tokenize
from embray.lifecycle.versions import read_manifest
from embray.search import HYBRID_DEPTH, HYBRID_WEIGHTS, RRF_K0
from embray.storage.store import Store

from .helpers import TENANTS, add_columns, doc_text, make_config, row_number, write_rows

pytestmark = pytest.mark.usefixtures("ray_local")

CODES = ["ERR_CONN_RESET", "Vec::retain", "os.path.join", "E1234", "x86_64"]


def corpus(n: int = 200) -> dict[str, str]:
    """Texts of shared words; every 20th row also names one identifier (each identifier in a few rows)."""
    rows = {}
    for i in range(n):
        text = doc_text(i)
        if i % 20 == 3:
            text += f" fails with {CODES[(i // 20) % len(CODES)]}"
        rows[f"doc-{i:04d}"] = text
    return rows


def holding(rows: dict[str, str], term: str) -> set[str]:
    """Ids whose text shares a token with ``term`` (what a keyword search finds: a BM25 score above 0)."""
    want = set(tokenize(term))
    return {i for i, t in rows.items() if want & set(tokenize(t))}


def build(tmp_path, rows, **over):
    write_rows(tmp_path / "corpus", rows, files=2)
    add_columns(tmp_path / "corpus")
    cfg = make_config(
        tmp_path,
        source={"columns": ["tenant", "n"]},
        index={"keywords": True, "max_delta_fraction": 0.4, **over.pop("index", {})},
        **over,
    )
    return cfg, Collection(cfg)


def test_keyword_search_finds_identifiers_through_refreshes_and_compaction(tmp_path):
    rows = corpus()
    cfg, col = build(tmp_path, rows)
    v1 = col.backfill(promote=True).version
    store = Store(cfg.store.uri)
    m = read_manifest(store, "docs", v1)
    assert m.index.keywords and all(s.keywords is not None for s in m.shards if s.rows)
    assert {f.path for f in m.files()} >= {s.keywords.path for s in m.shards if s.rows}
    assert col.verify(v1).ok and col.versions()[0].keywords is True

    for code in CODES:  # the identifier's rows first, by BM25; every hit shares a token with the query
        hits = col.search(code, k=5, mode="keyword").results
        named = {i for i, t in rows.items() if code in t}
        assert {h.id for h in hits[: len(named)]} == named, code
        assert all(h.score > 0 for h in hits)
    everything = col.search("ERR_CONN_RESET", k=1000, mode="keyword").results
    assert {h.id for h in everything} == holding(rows, "ERR_CONN_RESET")
    assert [h.score for h in everything] == sorted((h.score for h in everything), reverse=True)

    # A refresh: a row loses its identifier, another gains it, one holding it is deleted, new rows name it.
    changed = dict(rows)
    had = sorted(i for i, t in rows.items() if "ERR_CONN_RESET" in t)
    changed[had[0]] = doc_text(9000)  # no longer names it
    del changed[had[1]]
    changed["doc-0010"] = rows["doc-0010"] + " then ERR_CONN_RESET again"
    changed["new-0001"] = "a fresh row with ERR_CONN_RESET"
    write_rows(tmp_path / "corpus", changed, files=2)
    add_columns(tmp_path / "corpus")
    r = col.refresh(promote=True)
    assert r.manifest.counts["shards_delta"] >= 1 and r.counts.embedded == 3
    seg = [g for s in r.manifest.shards for g in s.segments]
    assert seg and all(g.keywords is not None for g in seg)
    got = {h.id for h in col.search("ERR_CONN_RESET", k=1000, mode="keyword").results}
    assert got == holding(changed, "ERR_CONN_RESET")
    assert had[0] not in {h.id for h in col.search("ERR_CONN_RESET", k=1000, mode="keyword").results}
    old = {h.id for h in col.search("ERR_CONN_RESET", k=1000, mode="keyword", version=v1).results}
    assert old == holding(rows, "ERR_CONN_RESET")  # the parent answers from its own files, as it was
    assert col.verify(r.version).ok
    compacted = col.compact(promote=True)
    assert not any(s.segments for s in compacted.manifest.shards)
    assert {h.id for h in col.search("ERR_CONN_RESET", k=1000, mode="keyword").results} == got

    # Filters restrict keyword and hybrid answers exactly.
    flt = {"tenant": "acme"}
    kw = col.search("ERR_CONN_RESET", k=1000, mode="keyword", filter=flt, fields=["tenant"]).results
    assert {h.id for h in kw} == {i for i in got if TENANTS[row_number(i) % 3] == "acme"}
    assert all(h.fields == {"tenant": "acme"} for h in kw)
    hy = col.search("river ERR_CONN_RESET", k=10, mode="hybrid", filter=flt).results
    assert hy and all(TENANTS[row_number(h.id) % 3] == "acme" for h in hy)


def test_hybrid_is_the_rank_fusion_of_vector_and_keyword_answers(tmp_path):
    rows = corpus()
    _, col = build(tmp_path, rows)
    col.backfill(promote=True)
    query, k = "falcon Vec::retain", 10
    depth = max(k, HYBRID_DEPTH)
    vec = col.search(query, k=depth).results
    kw = col.search(query, k=depth, mode="keyword").results
    hy = col.search(query, k=k, mode="hybrid").results
    fused = fuse_rrf([[h.id for h in vec], [h.id for h in kw]], list(HYBRID_WEIGHTS), k0=RRF_K0, limit=k)
    assert [h.id for h in hy] == [i for i, _ in fused]
    assert [h.score for h in hy] == pytest.approx([s for _, s in fused])
    assert {h.id for h in hy} & {h.id for h in kw[:3]} and {h.id for h in hy} & {h.id for h in vec[:3]}
    only_vec = col.search(query, k=k, mode="hybrid", weights={"keyword": 0}).results
    assert [h.id for h in only_vec] == [h.id for h in vec[:k]]
    only_kw = col.search(query, k=k, mode="hybrid", weights={"vector": 0}).results
    assert [h.id for h in only_kw] == [h.id for h in kw[:k]]
    many = col.search_many([query, "E1234"], k=5, mode="hybrid")
    assert [h.id for h in many[0].results] == [h.id for h in hy[:5]]

    with pytest.raises(QueryError, match="weights: both are 0"):
        col.search(query, mode="hybrid", weights={"vector": 0, "keyword": 0})
    with pytest.raises(QueryError, match="weights.vector"):
        col.search(query, mode="hybrid", weights={"vector": -1})
    with pytest.raises(QueryError, match="not a search mode"):
        col.search(query, mode="fuzzy")
    with pytest.raises(QueryError, match="searches by text"):
        col.search(vector=[0.0] * 64, fingerprint=col.index().fingerprint, mode="keyword")


def test_a_version_without_a_keyword_index_says_how_to_get_one(tmp_path):
    rows = corpus(40)
    write_rows(tmp_path / "corpus", rows, files=2)
    col = Collection(make_config(tmp_path))
    col.backfill(promote=True)
    with pytest.raises(QueryError, match="no keyword index; set index.keywords: true"):
        col.search("river", mode="keyword")
    with pytest.raises(QueryError, match="no keyword index"):
        col.search("river", mode="hybrid")
    assert col.search("river", k=3).results  # vector search is unchanged

    # Turning keywords on: every shard is rebuilt with its keyword index; nothing is embedded again.
    on = col.config.model_copy(update={"index": col.config.index.model_copy(update={"keywords": True})})
    r = Collection(on).refresh(promote=True)
    assert r.counts.embedded == 0 and all(s.keywords for s in r.manifest.shards if s.rows)
    assert {h.id for h in Collection(on).search("river", k=1000, mode="keyword").results} == holding(rows, "river")
    assert json.loads(r.manifest.to_json())["index"]["keywords"] is True


def test_chunked_documents_answer_keyword_queries_by_their_best_passage(tmp_path):
    words = "alpha beta gamma delta river stone cloud ember falcon canyon".split()
    rows = {f"doc-{i:03d}": " ".join(words[(i * j) % len(words)] for j in range(1, 120)) for i in range(30)}
    rows["doc-007"] += " and at the very end ERR_CONN_RESET"
    cfg, col = build(tmp_path, rows, chunk={"tokens": 32, "overlap": 4})
    col.backfill(promote=True)
    hit = col.search("ERR_CONN_RESET", k=3, mode="keyword", fields=["text"]).results[0]
    assert hit.id == "doc-007" and "ERR_CONN_RESET" in hit.fields["text"]
    assert rows["doc-007"][hit.chunk.start : hit.chunk.end] == hit.fields["text"]
    passages = col.search("river", k=50, mode="keyword", chunks=True).results
    docs = col.search("river", k=50, mode="keyword").results
    assert len({h.id for h in docs}) == len(docs)  # documents, once each
    assert len({h.id for h in passages}) < len(passages)  # passages: several of one document
