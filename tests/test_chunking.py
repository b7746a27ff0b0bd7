"""Long documents cut into passages (``chunk:``), on a real local Ray, local disk and sqlite MLflow: every
passage of a document is a row of the version (its document, ordinal, span and own vector), a refresh
embeds only passages whose text is new, the chunking is part of the vector space, and search answers
documents by their best passage (Python, CLI, HTTP). The 'hash' model cuts by words (fast); the MiniLM
tokenizer's limits are checked against its window."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from embray import Collection
from embray.config import ChunkConfig
from embray.errors import ConfigError, VersionError
from embray.lifecycle.registry import Registry
from embray.lifecycle.versions import read_manifest
from embray.models.spec import ModelSpec
from embray.pipeline.passages import chunk_meta, cutter
from embray.storage.rows import content_hash, shard_of
from embray.storage.segments import ShardFiles, live_rows
from embray.storage.store import Store

from .helpers import assert_same_content, content, free_port, make_config, write_rows

pytestmark = pytest.mark.usefixtures("ray_local")

CHUNK = {"tokens": 64, "overlap": 8}
HASH = ModelSpec(backend="hash", name="words", dims=64)
VOCAB = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
    "phi chi psi omega river stone cloud ember"
).split()


def paragraph(rng: random.Random) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(15, 50))) + "."


def document(seed: int, paragraphs: int) -> str:
    rng = random.Random(seed)
    return "\n\n".join(paragraph(rng) for _ in range(paragraphs))


def expected_passages(rows: dict[str, str]) -> dict[str, tuple[str, str, int, int, int]]:
    """passage id -> (content hash, document, ordinal, start, end), as the cutter cuts ``rows``."""
    cut = cutter(chunk_meta(ChunkConfig(**CHUNK), HASH), HASH)
    out = {}
    for doc, text in rows.items():
        for p in cut.cut(text):
            out[f"{doc}#{p.ordinal}#{p.start}"] = (content_hash(text[p.start : p.end]), doc, p.ordinal, p.start, p.end)
    return out


def stored(cfg, version: str) -> dict[str, tuple[str, str, int, int, int]]:
    """passage id -> (content hash, document, ordinal, start, end) of a committed version's live rows."""
    store = Store(cfg.store.uri)
    m = read_manifest(store, cfg.collection, version)
    out = {}
    for s in m.shards:
        t = live_rows(store, ShardFiles.of(m, s), ["id", "key", "content_hash", "doc", "ordinal", "start", "end"])
        if t is None:
            continue
        cols = [t.column(c).to_pylist() for c in ("id", "content_hash", "doc", "ordinal", "start", "end")]
        for i, *rest in zip(*cols, strict=True):
            out[i] = tuple(rest)
    return out


def test_a_chunked_backfill_holds_every_passage_of_every_document_with_its_span(tmp_path):
    rows = {
        "long": document(1, 40),
        "short": "one short line",
        "unicode": "naïve café — ünïcödé 東京 タワー 🚀🚀 emoji\n\n" + document(2, 6) + " e\u0301t\u0301é",
        "one-word": "x" * 5000,  # no boundary at all: fixed windows
        "lines": "\n".join(document(3, 1) for _ in range(12)),
        "blank": "   \n\n  ",
    }
    write_rows(tmp_path / "corpus", rows, files=2)
    cfg = make_config(tmp_path, chunk=CHUNK)
    col = Collection(cfg)
    built = col.backfill()
    m = built.manifest
    good = {k: v for k, v in rows.items() if k != "blank"}
    want = expected_passages(good)
    assert m.chunk is not None and (m.chunk.tokens, m.chunk.overlap, m.chunk.specials) == (64, 8, 0)
    assert m.counts.documents == 5 and m.rows == built.rows == len(want) > 40
    assert built.rejected_by_reason == {"empty text": 1}
    assert built.counts.embedded == len({(shard_of(d, 3), h) for h, d, *_ in want.values()})
    got = stored(cfg, built.version)
    assert got == want  # every passage, with its document, ordinal and exact span
    for h, doc, _, start, end in got.values():
        assert content_hash(rows[doc][start:end]) == h  # the span is the passage's text
    long = sorted((o, s, e) for _, d, o, s, e in got.values() if d == "long")
    assert [o for o, *_ in long] == list(range(len(long))) and long[0][1] == 0 and long[-1][2] == len(rows["long"])
    assert {v[1] for v in got.values()} == set(good)
    assert col.verify(built.version).ok
    audit = col.audit(built.version, sample=25, seed=1)  # passages re-embedded from their span of the source
    assert audit.ok and audit.compared == audit.sampled >= 20 and audit.min_cosine > 0.999
    gates = col.gates(built.version)  # ANN recall over passages
    assert gates.passed, gates.to_dict()

    params = Registry(cfg).client.get_run(m.mlflow_run_id).data.params
    assert (
        params["chunk.tokens"] == "64"
        and params["chunk.overlap"] == "8"
        and "embray-passages" in params["chunk.cutter"]
    )
    ds = col.dataset(built.version).to_pandas()
    assert {"id", "doc", "ordinal", "start", "end", "vector"} <= set(ds.columns) and len(ds) == len(want)


def test_search_answers_documents_by_their_best_passage(tmp_path, capsys):
    rows = {f"doc-{i:02d}": document(100 + i, 12) for i in range(20)}
    write_rows(tmp_path / "corpus", rows, files=2)
    cfg = make_config(tmp_path, chunk=CHUNK)
    col = Collection(cfg)
    col.backfill()
    deep = rows["doc-07"].split("\n\n")[9]  # from deep inside one document
    res = col.search(deep, k=5)
    ids = [h.id for h in res.results]
    assert ids[0] == "doc-07" and len(ids) == len(set(ids)) == 5  # k documents, each once
    top = res.results[0]
    assert deep in rows["doc-07"][top.chunk.start : top.chunk.end]  # the passage that holds the query
    assert res.to_dict()["results"][0]["chunk"] == {
        "ordinal": top.chunk.ordinal,
        "start": top.chunk.start,
        "end": top.chunk.end,
    }
    scores = [h.score for h in res.results]
    assert scores == sorted(scores, reverse=True)

    raw = col.search(deep, k=30, chunks=True).results  # passages themselves: a document's several passages
    assert len(raw) == 30 and len({h.id for h in raw}) < 30
    assert raw[0].chunk == top.chunk and raw[0].score == pytest.approx(top.score)
    best: dict[str, float] = {}
    for h in col.search(deep, k=500, chunks=True).results:  # every passage: the best per document, in order
        best.setdefault(h.id, h.score)
    everything = col.search(deep, k=20).results
    assert [h.id for h in everything] == list(best)[:20] and len(everything) == 20

    # Shard groups (a Serve ingress over G groups): a document's passages are all in its shard, so the groups'
    # best documents, merged by score, are the whole version's answer.
    from embray.search import VersionIndex, merge_hits

    m = col.manifest()
    q = col.index().embedder.embed_queries([deep])
    groups = [VersionIndex(col.store, m, group=(g, 2)).search_vectors(q, 5)[0] for g in range(2)]
    assert merge_hits(groups, 5) == col.index().search_vectors(q, 5)[0]

    from embray.cli import cli

    cfg_path = tmp_path / "embray.yaml"
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["search", "--config", str(cfg_path), deep, "-k", "3", "--json"], prog_name="embray")
    assert exit_info.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["id"] == "doc-07" and out["results"][0]["chunk"]["start"] == top.chunk.start


def test_refresh_embeds_only_new_passages_of_edited_moved_and_deleted_documents(tmp_path):
    rows = {"big": document(7, 60), "other": document(8, 10), "gone": document(9, 10)}
    write_rows(tmp_path / "corpus", rows, files=2)
    cfg = make_config(tmp_path, chunk=CHUNK, index={"shards": 2})
    col = Collection(cfg)
    base = col.backfill()
    assert len([1 for v in stored(cfg, base.version).values() if v[1] == "big"]) >= 40

    paras = rows["big"].split("\n\n")
    paras[30] = paragraph(random.Random(99))  # one paragraph of a 40+ passage document edited
    edited = {**rows, "big": "\n\n".join(paras)}
    write_rows(tmp_path / "corpus", edited, files=2)
    child = col.refresh()
    assert 1 <= child.counts.embedded <= 3, child.to_dict()
    assert stored(cfg, child.version) == expected_passages(edited)

    moved = {**edited, "other": paragraph(random.Random(5)) + "\n\n" + edited["other"]}  # text moved down
    del moved["gone"]  # a deleted document takes all its passages with it
    write_rows(tmp_path / "corpus", moved, files=2)
    later = col.refresh(parent=child.version)
    got = stored(cfg, later.version)
    assert got == expected_passages(moved) and "gone" not in {v[1] for v in got.values()}
    assert later.counts.embedded <= 3  # the new paragraph's passages; the shifted ones come from the parent
    assert later.counts.deleted >= len([1 for v in stored(cfg, child.version).values() if v[1] == "gone"])
    assert col.verify(later.version).ok

    fresh_cfg = make_config(tmp_path, chunk=CHUNK, index={"shards": 2}, store={"uri": str(tmp_path / "fresh")})
    fresh = Collection(fresh_cfg).backfill()
    assert_same_content(content(cfg, later.version), content(fresh_cfg, fresh.version))


def test_a_refresh_never_mixes_chunkings_and_a_migration_recuts(tmp_path):
    rows = {f"d{i}": document(i, 8) for i in range(6)}
    write_rows(tmp_path / "corpus", rows, files=2)
    cfg = make_config(tmp_path, chunk=CHUNK)
    base = Collection(cfg).backfill()

    for other in ({"tokens": 96, "overlap": 8}, "none"):
        with pytest.raises(VersionError, match="a refresh never mixes two chunkings.*embray migrate"):
            Collection(make_config(tmp_path, chunk=other)).refresh()
    kept = Collection(make_config(tmp_path)).refresh()  # chunk: left out: the parent's chunking
    assert kept.manifest.chunk == base.manifest.chunk and kept.counts.embedded == 0
    again = Collection(make_config(tmp_path)).backfill()  # left out: the active version's chunking
    assert again.manifest.chunk == base.manifest.chunk and again.rows == base.rows

    with pytest.raises(VersionError, match="needs a different model or chunking"):
        Collection(cfg).migrate(cfg.model)
    recut = Collection(make_config(tmp_path, chunk={"tokens": 96, "overlap": 8})).migrate(cfg.model)
    assert recut.manifest.chunk.tokens == 96 and recut.manifest.fingerprint == base.fingerprint
    assert recut.manifest.rows < base.manifest.rows  # fewer, longer passages, no vector taken from the parent
    assert stored(cfg, recut.version) and Collection(cfg).verify(recut.version).ok
    unchunked = Collection(make_config(tmp_path, chunk="none")).migrate(cfg.model)
    assert unchunked.manifest.chunk is None and unchunked.rows == len(rows)
    hit = Collection(cfg).search(rows["d3"], k=1, version=unchunked.version).results[0]
    assert hit.id == "d3" and hit.chunk is None


def test_chunk_settings_are_checked_against_the_model():
    minilm = ModelSpec(backend="sentence-transformers", name="all-MiniLM-L6-v2")
    meta = chunk_meta(ChunkConfig(), minilm)
    assert (meta.tokens, meta.specials) == (256, 2)  # sized to the model's window; [CLS] and [SEP]
    with pytest.raises(ConfigError, match="chunk.tokens is 512 but model .* reads at most 256"):
        chunk_meta(ChunkConfig(tokens=512), minilm)
    prefixed = chunk_meta(ChunkConfig(), minilm.model_copy(update={"document_prefix": "passage: "}))
    assert prefixed.specials > 2  # the prefix is read too: it comes out of each passage's budget
    with pytest.raises(ConfigError, match="no token window.*chunk.tokens"):
        chunk_meta(ChunkConfig(), HASH)
    with pytest.raises(ValueError, match="overlap 40 must be under half"):
        ChunkConfig(tokens=64, overlap=40)
    text = document(1, 30)
    for p in cutter(meta, minilm).cut(text):  # each passage fits the model's window with its special tokens
        tok = cutter(meta, minilm).tokenizer
        assert len(tok.encode(text[p.start : p.end]).ids) <= 256


def test_http_search_returns_documents_with_spans(tmp_path):
    from ray import serve

    from embray.serving import application

    rows = {f"doc-{i:02d}": document(200 + i, 10) for i in range(12)}
    write_rows(tmp_path / "corpus", rows, files=2)
    port = free_port()
    cfg = make_config(tmp_path, chunk=CHUNK, serve={"port": port, "poll_s": 1.0, "num_cpus": 0.5})
    Collection(cfg).backfill()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(application(cfg), name="embray", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/collections/docs/search"
        deep = rows["doc-04"].split("\n\n")[7]
        body = requests.post(url, json={"text": deep, "k": 4}, timeout=60).json()
        hits = body["results"]
        assert hits[0]["id"] == "doc-04" and len({h["id"] for h in hits}) == 4
        c = hits[0]["chunk"]
        assert deep in rows["doc-04"][c["start"] : c["end"]] and set(c) == {"ordinal", "start", "end"}
        raw = requests.post(url, json={"text": deep, "k": 12, "chunks": True}, timeout=60).json()["results"]
        assert len(raw) == 12 and len({h["id"] for h in raw}) < 12
        bad = requests.post(url, json={"text": deep, "chunks": "many"}, timeout=60)
        assert bad.status_code == 422
    finally:
        serve.shutdown()


# --- refreshes of chunked documents, step by step, equal a fresh backfill -----------------------------------

DOCS = [f"doc-{i}" for i in range(5)]
PARAS = [paragraph(random.Random(1000 + i)) for i in range(8)]
# One edit: a document's paragraphs replaced by picks from a small pool (so passages come back and move), or
# the document deleted.
doc_edits = st.lists(
    st.tuples(st.sampled_from(DOCS), st.one_of(st.none(), st.lists(st.sampled_from(PARAS), min_size=1, max_size=9))),
    max_size=4,
)


def _apply(rows: dict[str, str], step) -> dict[str, str]:
    out = dict(rows)
    for doc, paras in step:
        if paras is None:
            out.pop(doc, None)
        else:
            out[doc] = "\n\n".join(paras)
    out["anchor-a"], out["anchor-b"] = "\n\n".join(PARAS), PARAS[0]  # never empty; a row in each of the 2 files
    return out


@settings(
    max_examples=4,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(first=doc_edits, steps=st.lists(st.tuples(doc_edits, st.booleans()), min_size=1, max_size=3))
def test_step_by_step_refreshes_of_chunked_documents_equal_a_fresh_backfill(first, steps):
    tmp = Path(tempfile.mkdtemp(prefix="embray-chunkprop-"))
    try:
        limits = {"shards": 2, "max_delta_fraction": 1.0, "max_segments": 2}
        cfg = make_config(tmp, chunk=CHUNK, index=limits)
        col = Collection(cfg)
        rows = _apply({}, first)
        write_rows(tmp / "corpus", rows, files=2)
        version = col.backfill().version
        seen = {(shard_of(d, 2), h) for h, d, *_ in expected_passages(rows).values()}
        for step, compact in steps:
            rows = _apply(rows, step)
            write_rows(tmp / "corpus", rows, files=2)
            want = expected_passages(rows)
            unseen = {(shard_of(d, 2), h) for h, d, *_ in want.values()} - seen
            child = col.refresh(parent=version)
            assert child.counts.embedded == len(unseen), child.to_dict()
            seen |= unseen
            assert stored(cfg, child.version) == want
            version = child.version
            if compact and any(sh.segments or sh.tombstones for sh in child.manifest.shards):
                folded = col.compact(version)
                assert folded.counts.embedded == 0 and stored(cfg, folded.version) == want
                version = folded.version
        assert col.verify(version).ok
        fresh_cfg = make_config(tmp, chunk=CHUNK, index={"shards": 2}, store={"uri": str(tmp / "fresh")})
        fresh = Collection(fresh_cfg).backfill()
        got, again = content(cfg, version), content(fresh_cfg, fresh.version)
        assert_same_content(got, again)
        assert all(np.isfinite(v).all() for _, v in got.values())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_without_chunking_the_rows_the_model_window_cuts_short_are_counted(tmp_path, caplog):
    from tokenizers import Tokenizer

    from embray.models.spec import resolve_model_path

    rows = {f"short-{i}": f"a short text number {i}" for i in range(12)}
    rows.update({f"long-{i}": document(300 + i, 12 + 4 * i) for i in range(4)})  # ~400-800 words
    write_rows(tmp_path / "corpus", rows, files=2)
    minilm = {"backend": "sentence-transformers", "name": "all-MiniLM-L6-v2", "dims": None}
    cfg = make_config(tmp_path, model=minilm, chunk="none", index={"shards": 2})
    tok = Tokenizer.from_file(str(resolve_model_path(cfg.model) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    over = {i: len(tok.encode(t).ids) - 256 for i, t in rows.items() if len(tok.encode(t).ids) > 256}
    assert set(over) == {f"long-{i}" for i in range(4)}

    with caplog.at_level("WARNING", logger="embray"):
        built = Collection(cfg).backfill()
    t = built.truncation
    assert (t.rows, t.tokens, t.window) == (4, sum(over.values()), 256)
    assert built.to_dict()["truncated"] == {"rows": 4, "tokens": sum(over.values()), "window": 256}
    assert "4 of 16 rows are longer than model" in caplog.text and "chunk:" in caplog.text
    m = built.manifest
    assert (m.counts.truncated, m.counts.truncated_tokens) == (4, sum(over.values())) and m.chunk is None
    metrics = Registry(cfg).client.get_run(m.mlflow_run_id).data.metrics
    assert metrics["truncated_rows"] == 4 and metrics["truncated_tokens"] == sum(over.values())

    edited = {**rows, "long-0": "now a short text", "short-0": document(400, 12)}  # one fits now, one does not
    write_rows(tmp_path / "corpus", edited, files=2)
    again = Collection(cfg).refresh()
    over2 = {i: len(tok.encode(t).ids) - 256 for i, t in edited.items() if len(tok.encode(t).ids) > 256}
    assert (again.truncation.rows, again.truncation.tokens) == (4, sum(over2.values()))
    report = Collection(cfg).status(verify=False, staleness=False)
    assert report.active.truncated_rows == 4  # the active version (the backfill) as `embray status` shows it

    hashed = make_config(tmp_path, store={"uri": str(tmp_path / "hash-store")})  # no window: nothing to count
    plain = Collection(hashed).backfill()
    assert plain.truncation is None and "truncated" not in plain.to_dict() and plain.manifest.chunk is None

    # A new collection with `chunk:` left out: passages sized to the model's window, nothing truncated.
    fresh = make_config(tmp_path, model=minilm, index={"shards": 2}, store={"uri": str(tmp_path / "new-store")})
    assert fresh.chunk is None
    auto = Collection(fresh).backfill()
    assert auto.manifest.chunk.tokens == 256 and auto.documents == 16 and auto.rows > 16
    assert auto.truncation is None and auto.to_dict()["documents"] == 16


def test_a_document_the_tokenizer_reads_nothing_of_is_rejected_with_its_reason():
    import pyarrow as pa

    from embray.pipeline.scan import prepare, with_passages
    from embray.storage.rows import NO_TOKENS

    minilm = ModelSpec(backend="sentence-transformers", name="all-MiniLM-L6-v2")
    cut = cutter(chunk_meta(ChunkConfig(), minilm), minilm)
    batch = pa.table({"id": ["zero-width", "words", "blank"], "text": ["\u200b\u200b\u200b", "real words", " "]})
    t = with_passages(prepare(batch, id_col="id", text_col="text", shards=2, first_row=0), cut)
    assert t.column("reason").to_pylist() == [NO_TOKENS, None, "empty text"]  # never a document without a vector
    assert t.column("p_hash").to_pylist()[0] is None and len(t.column("p_hash")[1]) == 1
    assert t.column("p_start")[1].as_py() == [0] and t.column("p_end")[1].as_py() == [len("real words")]
