"""Search over a committed version: quality of the ANN shards, and refusals that keep spaces apart."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from embray import Collection
from embray.errors import VersionError
from embray.lifecycle.versions import file_rel
from embray.search import VersionIndex
from embray.storage.store import Store

from .helpers import make_config, mutate, write_corpus, write_rows

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    corpus = write_corpus(tmp / "corpus", files=4, rows=5000)
    cfg = make_config(tmp, model={"dims": 96}, index={"shards": 4}, embed={"batch_size": 2000})
    result = Collection(cfg).backfill()
    return cfg, result, corpus


def _all_vectors(cfg, manifest):
    store = Store(cfg.store.uri)
    parts = [pq.read_table(store.path(file_rel(manifest, s.embeddings))) for s in manifest.shards]
    ids = [i for p in parts for i in p.column("id").to_pylist()]
    vecs = np.concatenate([np.stack(p.column("vector").to_numpy(zero_copy_only=False)) for p in parts])
    return ids, vecs


def test_ann_recall_at_10_against_exact_search(built):
    cfg, result, _ = built
    vi = Collection(cfg).index()
    ids, vecs = _all_vectors(cfg, result.manifest)
    rng = np.random.default_rng(7)
    queries = vecs[rng.choice(len(vecs), 200, replace=False)] + rng.normal(0, 0.05, (200, vecs.shape[1]))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    scores = queries @ vecs.T  # brute force over the float32 vectors
    exact = np.argsort(-scores, axis=1)[:, :10]
    kth = np.take_along_axis(scores, exact[:, 9:10], axis=1)[:, 0]
    pos = {i: n for n, i in enumerate(ids)}

    def recall(results) -> float:
        # A hit counts when it is in the true top 10 by score: hashed 96-dim vectors have exact ties at the
        # 10th place, and which of two tied ids a search returns is not a quality difference.
        return float(
            np.mean([sum(scores[q, pos[h.id]] >= kth[q] - 1e-3 for h in hits) / 10 for q, hits in enumerate(results)])
        )

    ann = vi.search_vectors(queries, k=10)
    assert recall(ann) >= 0.95, f"ANN recall@10 {recall(ann):.3f}"
    strict = np.mean(
        [len({h.id for h in hits} & {ids[j] for j in row}) / 10 for hits, row in zip(ann, exact, strict=True)]
    )
    assert strict >= 0.9, f"ANN recall@10 by id {strict:.3f}"
    # The shards' exact mode finds the same top 10 (f16 storage moves scores by < 1e-3).
    exact_shards = vi.search_vectors(queries, k=10, exact=True)
    assert recall(exact_shards) >= 0.99, f"exact-mode recall@10 {recall(exact_shards):.3f}"
    got = np.array([[h.score for h in hits] for hits in exact_shards])
    want = np.take_along_axis(scores, exact, axis=1)
    assert np.abs(got - want).max() < 5e-3


def test_text_search_uses_the_versions_model_and_ranks_best_first(built):
    cfg, _, corpus = built
    vi = Collection(cfg).index()
    query = corpus["doc-004321"]
    (hits,) = vi.search_text([query], k=10)
    # The query's own document scores ~1 (hash collisions in 96 dims can tie a few others with it).
    assert hits[0].score == pytest.approx(1.0, abs=1e-2)
    assert "doc-004321" in [h.id for h in hits if h.score > 0.99]
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and len(hits) == 10


def test_mixed_fingerprints_and_foreign_vectors_are_refused(built):
    cfg, result, _ = built
    store = Store(cfg.store.uri)
    m = result.manifest
    shards = list(m.shards)
    shards[2] = shards[2].model_copy(update={"fingerprint": "0" * 24})
    with pytest.raises(VersionError, match=r"mixes fingerprints"):
        VersionIndex(store, m.model_copy(update={"shards": shards}))
    vi = VersionIndex(store, m)
    with pytest.raises(VersionError, match=r"query vectors have 10 dims; version .* has 96"):
        vi.search_vectors(np.ones((1, 10), dtype=np.float32))
    other_model = m.model_copy(update={"model": m.model.model_copy(update={"seed": 9})})
    with pytest.raises(VersionError, match=r"that model here has fingerprint .*: its weights or spec differ"):
        VersionIndex(store, other_model).search_text(["river"])


def test_no_active_version_is_a_clear_error(tmp_path):
    cfg = make_config(tmp_path)
    with pytest.raises(VersionError, match=r"has no 'active' version yet; run `embray backfill"):
        Collection(cfg).index()


def test_recall_holds_on_shards_updated_in_place(built, tmp_path):
    """A refresh edits the parent's HNSW graphs (removals and additions); search quality must not drop."""
    import shutil

    cfg, _, corpus = built
    # Work on a copy so the module's other tests keep their version.
    root = tmp_path / "copy"
    shutil.copytree(cfg.source.uri, root / "corpus")
    shutil.copytree(cfg.store.uri, root / "store")
    # (max_delta_fraction 0: no delta segments, so each shard's graph is updated in place)
    copy = make_config(
        root, model={"dims": 96}, index={"shards": 4, "max_delta_fraction": 0}, embed={"batch_size": 2000}
    )
    changed = mutate(corpus, n_insert=400, n_update=400, n_delete=200)[0]
    write_rows(root / "corpus", changed, files=4)
    col = Collection(copy)
    child = col.refresh()
    assert child.manifest.counts["shards_updated"] == 4
    vi = col.index(child.version)
    ids, vecs = _all_vectors(copy, child.manifest)
    assert sorted(ids) == sorted(changed)
    rng = np.random.default_rng(11)
    queries = vecs[rng.choice(len(vecs), 200, replace=False)] + rng.normal(0, 0.05, (200, vecs.shape[1]))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    scores = queries @ vecs.T
    kth = np.sort(scores, axis=1)[:, -10]
    pos = {i: n for n, i in enumerate(ids)}
    hits = vi.search_vectors(queries, k=10)
    recall = np.mean([sum(scores[q, pos[h.id]] >= kth[q] - 1e-3 for h in hs) / 10 for q, hs in enumerate(hits)])
    assert recall >= 0.95, f"recall@10 after an in-place update {recall:.3f}"


def test_shard_groups_hold_their_shards_only_and_merge_to_the_whole_answer(tmp_path):
    """A version split into shard groups (a replica each, for versions larger than one replica): every group
    opens only its shards, and their answers merged equal the whole version's, in any order."""
    from embray.lifecycle.versions import read_manifest
    from embray.search import group_shards, merge_hits

    rows = write_corpus(tmp_path / "corpus", files=2, rows=150)
    cfg = make_config(tmp_path, index={"shards": 4})
    v = Collection(cfg).backfill().version
    store = Store(cfg.store.uri)
    m = read_manifest(store, "docs", v)
    whole = VersionIndex(store, m)
    groups = [VersionIndex(store, m, group=(g, 2), shared=whole) for g in range(2)]
    assert group_shards(4, 0, 2) == [0, 2] and group_shards(4, 1, 2) == [1, 3]
    assert [len(gr.shards) for gr in groups] == [2, 2]
    texts = [rows[f"doc-{i:06d}"] for i in range(0, 150, 7)] + ["river mountain", "a b c"]
    vectors = whole.embedder.embed_queries(texts)
    want = whole.search_vectors(vectors, 10)
    parts = [gr.search_vectors(vectors, 10) for gr in groups]
    for qi in range(len(texts)):
        merged = merge_hits([p[qi] for p in parts], 10)
        assert merged == want[qi]
        assert merge_hits([p[qi] for p in reversed(parts)], 10) == merged
    with pytest.raises(VersionError, match="shard group 2 of 2 does not exist"):
        VersionIndex(store, m, group=(2, 2))
