"""Property-based tests of the build invariants (hypothesis), on a real local Ray, local disk and sqlite MLflow.

Whatever sequence of inserts, updates, deletes and returning texts a corpus goes through, refreshing it
step by step (with delta segments and tombstones piling up and being compacted, by a refresh past the
limits or by ``compact`` between refreshes, or not) gives exactly what a fresh backfill of the final corpus
gives (ids, content hashes and vectors), and each step embeds exactly the texts that were never seen before
in that vector space.
The vector cache is kept per shard (``<collection>/cache/<fingerprint>/shard-k-of-n/``), so "seen" means
seen in the shard the row's id hashes to: a text that comes back under an id of another shard is
embedded once more, for that shard.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from embray import Collection
from embray.storage.rows import content_hash, shard_of

from .helpers import assert_same_content, content, doc_text, make_config, write_rows

pytestmark = pytest.mark.usefixtures("ray_local")

SHARDS = 2
IDS = [f"id-{i:02d}" for i in range(14)]
TEXTS = [doc_text(i) for i in range(10)]  # a small pool, so texts come back under other ids and later steps

# (index.max_delta_fraction, index.max_segments): never segments; segments that pile up; a compaction at
# every other refresh; the default. Whichever, the rows a version stands for are the same.
LIMITS = [(0.0, 0), (1.0, 8), (1.0, 1), (0.1, 8)]

# One step: up to 6 edits, each (id, text) to insert or update, or (id, None) to delete.
edits = st.lists(st.tuples(st.sampled_from(IDS), st.one_of(st.none(), st.sampled_from(TEXTS))), max_size=6)
# A refresh step, then maybe `compact` of what it built (when it has segments or tombstones to fold).
steps = st.tuples(edits, st.booleans())


def _apply(rows: dict[str, str], step: list[tuple[str, str | None]]) -> dict[str, str]:
    out = dict(rows)
    for row_id, text in step:
        if text is None:
            out.pop(row_id, None)
        else:
            out[row_id] = text
    # Never empty (a corpus without rows is refused, tested elsewhere), and a row in each of the 2 files.
    out["anchor-a"], out["anchor-b"] = TEXTS[0], TEXTS[1]
    return out


def _keys(rows: dict[str, str]) -> set[tuple[int, str]]:
    """(shard, content hash) of every row: the unit the vector cache stores."""
    return {(shard_of(i, SHARDS), content_hash(t)) for i, t in rows.items()}


def _cached(cfg, fp: str) -> set[tuple[int, str]]:
    """(shard, content hash) of every vector in the collection's cache of space ``fp``."""
    import pyarrow.parquet as pq

    root = Path(cfg.store.uri) / cfg.collection / "cache" / fp
    out = set()
    for f in root.glob("shard-*/*.parquet"):
        shard = int(f.parent.name.split("-")[1])
        out.update((shard, h) for h in pq.read_table(f, columns=["content_hash"]).column(0).to_pylist())
    return out


# Each example runs several builds on Ray (seconds each): few examples, and no shrinking (it would take many
# minutes); a failure prints its example and its seed (--hypothesis-seed) to rerun it.
@settings(
    max_examples=5,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(first=edits, steps=st.lists(steps, min_size=1, max_size=3), limits=st.sampled_from(LIMITS))
# Always one run through `compact` (the drawn examples may not ask for it): a delta refresh, compacted, refreshed.
@example(
    first=[("id-01", TEXTS[2]), ("id-02", TEXTS[2])],
    steps=[([("id-01", TEXTS[3]), ("id-02", None)], True), ([("id-03", TEXTS[4])], False)],
    limits=(1, 8),
)
def test_step_by_step_refreshes_equal_a_fresh_backfill_and_embed_only_unseen_texts(first, steps, limits):
    tmp = Path(tempfile.mkdtemp(prefix="embray-prop-"))
    try:
        fraction, segments = limits
        cfg = make_config(tmp, index={"shards": SHARDS, "max_delta_fraction": fraction, "max_segments": segments})
        col = Collection(cfg)
        rows = _apply({}, first)
        write_rows(tmp / "corpus", rows, files=2)
        built = col.backfill()
        seen = _keys(rows)
        assert built.counts.embedded == len(seen)
        assert _cached(cfg, built.fingerprint) == seen
        version = built.version
        for step, compact in steps:
            rows = _apply(rows, step)
            write_rows(tmp / "corpus", rows, files=2)
            unseen = _keys(rows) - seen
            child = col.refresh(version)
            assert child.parent == version
            assert child.counts.embedded == len(unseen), (child.to_dict(), unseen)
            assert _cached(cfg, built.fingerprint) == seen | unseen  # exactly those texts went to the model
            seen |= unseen
            got = content(cfg, child.version)
            assert {i: h for i, (h, _) in got.items()} == {i: content_hash(t) for i, t in rows.items()}
            assert col.verify(child.version).ok
            version = child.version
            if compact and any(sh.segments or sh.tombstones for sh in child.manifest.shards):
                folded = col.compact(version)
                assert folded.counts.embedded == 0 and _cached(cfg, built.fingerprint) == seen  # nothing embedded
                assert not any(sh.segments or sh.tombstones for sh in folded.manifest.shards)
                assert_same_content(content(cfg, folded.version), got)
                assert col.verify(folded.version).ok
                version = folded.version

        fresh_cfg = make_config(tmp, index={"shards": SHARDS}, store={"uri": str(tmp / "fresh")})
        fresh = Collection(fresh_cfg).backfill()
        assert fresh.fingerprint == built.fingerprint
        assert_same_content(content(cfg, version), content(fresh_cfg, fresh.version))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
