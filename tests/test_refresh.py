"""Refresh and migrate on a real local Ray, local disk and sqlite MLflow (hash backend)."""

from __future__ import annotations

import numpy as np
import pytest

from embray import Collection
from embray.errors import ConfigError, VersionError
from embray.lifecycle.registry import ACTIVE, CANDIDATE, Registry
from embray.lifecycle.versions import list_versions
from embray.models import ModelSpec, fingerprint
from embray.storage.store import Store

from .helpers import assert_same_content, content, make_config, mutate, write_corpus, write_rows

pytestmark = pytest.mark.usefixtures("ray_local")


def test_refresh_embeds_exactly_what_changed_and_equals_a_fresh_build(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=3, rows=200)
    cfg = make_config(tmp_path)
    col = Collection(cfg)
    parent = col.backfill()
    changed_rows, inserted, updated, deleted = mutate(rows, n_insert=25, n_update=15, n_delete=10)
    write_rows(tmp_path / "corpus", changed_rows)

    child = col.refresh()
    s = child.to_dict()
    assert (s["new"], s["changed"], s["deleted"]) == (25, 15, 10)
    assert s["reused"] == 600 - 15 - 10 and s["embedded"] == 40 and s["rows"] == 615
    assert s["parent"] == parent.version and s["aliases"] == []  # not promoted unless asked
    m = child.manifest
    assert m.parent == parent.version and m.counts["kind"] == "refresh"
    assert {k: m.counts[k] for k in ("new", "changed", "deleted", "reused")} == {
        "new": 25,
        "changed": 15,
        "deleted": 10,
        "reused": 575,
    }
    # A small change (under index.max_delta_fraction): each shard keeps its parent's index and adds a delta
    # segment of the new and changed rows, and tombstones for the changed and deleted rows' old keys.
    assert m.counts["shards_delta"] == 3 and m.counts["shards_updated"] == 0
    assert all(len(sh.segments) == 1 and sh.tombstones is not None and sh.embeddings.version for sh in m.shards)
    assert sum(sh.segments[0].rows for sh in m.shards) == 40 and sum(sh.dead for sh in m.shards) == 25
    mv = Registry(cfg).model_version(child.version)
    assert mv.tags["embray.parent"] == parent.version
    assert Registry(cfg).aliases()[ACTIVE] == parent.version
    assert col.verify(child.version).problems == []

    # Same content as building the mutated corpus from scratch (in a fresh store).
    fresh_cfg = make_config(tmp_path, store={"uri": str(tmp_path / "fresh-store")})
    fresh = Collection(fresh_cfg).backfill()
    assert_same_content(content(cfg, child.version), content(fresh_cfg, fresh.version))
    # The parent is untouched, and search over the child sees the change.
    assert set(content(cfg, parent.version)) == set(rows)
    vi = col.index(child.version)
    new_id = sorted(inserted)[0]
    assert vi.search_text([changed_rows[new_id]], k=1)[0][0].id == new_id
    gone = sorted(deleted)[0]
    assert all(h.id != gone for h in vi.search_text([rows[gone]], k=20)[0])


def test_refresh_of_unchanged_corpus_embeds_nothing_and_reuses_every_shard(tmp_path):
    write_corpus(tmp_path / "corpus", files=2, rows=150)
    cfg = make_config(tmp_path)
    col = Collection(cfg)
    parent = col.backfill()

    plan = col.refresh(dry_run=True)
    assert plan.to_dict()["version"] is None
    assert (plan.counts.new, plan.counts.changed, plan.counts.deleted) == (0, 0, 0)
    assert len(list_versions(Store(cfg.store.uri), cfg.collection)) == 1  # a dry run writes no version

    child = col.refresh(promote=True)
    assert child.counts.embedded == 0 and child.counts.reused == 300
    m = child.manifest
    assert m.counts["shards_reused"] == 3
    assert all(s.embeddings.version == parent.version and s.index.version == parent.version for s in m.shards)
    assert Registry(cfg).aliases()[ACTIVE] == child.version
    assert col.index().search_text(["river mountain"], k=3)[0]
    # A grandchild reuses the same files, still pointing at the version that holds them.
    grandchild = col.refresh()
    assert {s.index.version for s in grandchild.manifest.shards} == {parent.version}


def test_migrate_is_a_separate_space_and_its_rerun_costs_nothing(tmp_path):
    write_corpus(tmp_path / "corpus", files=2, rows=100)
    cfg = make_config(tmp_path)
    col = Collection(cfg)
    v1 = col.backfill()
    other = ModelSpec(backend="hash", name="words", dims=64, seed=1)  # same dims, a different space
    assert fingerprint(other) != fingerprint(cfg.model)

    m1 = col.migrate(other)
    assert m1.fingerprint == fingerprint(other) and m1.counts.embedded == 200
    aliases = Registry(cfg).aliases()
    assert aliases[ACTIVE] == v1.version and aliases[CANDIDATE] == m1.version
    assert m1.manifest.parent == v1.version
    assert {s.fingerprint for s in m1.manifest.shards} == {m1.fingerprint}
    assert col.verify(m1.version).problems == []
    # No vector of the old space was reused: every vector is the new model's.
    old, new = content(cfg, v1.version), content(cfg, m1.version)
    assert all(not np.array_equal(old[i][1], new[i][1]) for i in old)

    m2 = col.migrate(other)  # the rerun: everything from the (fingerprint, content_hash) cache
    assert m2.counts.embedded == 0 and m2.counts.cache_hits == 200
    assert_same_content(content(cfg, m1.version), content(cfg, m2.version))

    # Refresh keeps to the parent's space: with the config on another model it refuses.
    with pytest.raises(VersionError, match=r"never mixes two vector spaces: use `embray migrate`"):
        Collection(cfg.model_copy(update={"model": other})).refresh()
    # A migration to the active model itself is refused too.
    with pytest.raises(VersionError, match=r"already uses"):
        col.migrate(cfg.model)


def test_content_that_comes_back_is_not_embedded_again(tmp_path):
    rows = write_corpus(tmp_path / "corpus", files=2, rows=100)
    cfg = make_config(tmp_path)
    col = Collection(cfg)
    col.backfill()
    gone = sorted(rows)[:10]
    write_rows(tmp_path / "corpus", {i: t for i, t in rows.items() if i not in gone})
    assert col.refresh(promote=True).counts.deleted == 10
    write_rows(tmp_path / "corpus", rows)
    back = col.refresh()
    assert back.counts.new == 10 and back.counts.embedded == 0 and back.counts.cache_hits == 10


def test_refresh_refuses_a_changed_shard_count(tmp_path):
    write_corpus(tmp_path / "corpus", files=1, rows=50)
    cfg = make_config(tmp_path)
    Collection(cfg).backfill()
    with pytest.raises(ConfigError, match=r"index.shards is 5 but version .* has 3 shards"):
        Collection(make_config(tmp_path, index={"shards": 5})).refresh()
