"""The manifest as typed models: committed manifests keep loading and are written back byte for byte; older
manifests (sections with fewer keys, keys no longer known) load with their gaps read as "not recorded"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embray.config import IndexConfig
from embray.lifecycle.verify import count_problems
from embray.lifecycle.versions import (
    BuildKind,
    BuildStats,
    Manifest,
    ShardAction,
    SourceMeta,
    VersionCounts,
)

# Written by embray at 5fc35a0 (before the sections were typed): a refresh with a delta segment.
OLD = Path(__file__).parent / "data" / "manifest-refresh-5fc35a0.json"


def test_a_committed_manifest_loads_typed_and_is_written_back_byte_for_byte():
    raw = OLD.read_bytes()
    m = Manifest.model_validate_json(raw)
    assert isinstance(m.index, IndexConfig) and isinstance(m.source, SourceMeta)
    assert isinstance(m.counts, VersionCounts) and isinstance(m.stats, BuildStats)
    assert m.counts.kind is BuildKind.REFRESH and m.counts.shards_delta >= 1
    assert m.index.max_delta_fraction == 0.5 and m.source.id_column == "id"
    assert m.to_json() == raw  # the JSON written is the JSON embray wrote before the sections were typed


def test_sections_still_read_like_the_dicts_they_were():
    m = Manifest.model_validate_json(OLD.read_bytes())
    assert m.counts["kind"] == "refresh" and m.counts["rows"] == m.rows
    assert m.source["digest"] == m.source.digest and m.index["metric"] == m.index.metric == "cos"
    with pytest.raises(KeyError, match="no_such_key"):
        m.counts["no_such_key"]


def _older(**sections) -> Manifest:
    doc = json.loads(OLD.read_text())
    for name, keep in sections.items():
        doc[name] = {k: v for k, v in doc[name].items() if k in keep}
    doc["stats"]["rows_per_s"] = 123.0  # a key older builds wrote and this code no longer knows
    return Manifest.model_validate(doc)


def test_an_older_manifest_loads_and_its_missing_counts_are_not_checked():
    m = _older(counts={"new", "changed", "deleted", "reused", "embedded", "cache_hits", "rejected"})
    assert m.counts.kind is None and m.counts.rows is None and m.counts.input_rows is None
    assert count_problems(m, m.rows) == []  # "not recorded" is not "zero rows"
    assert json.loads(m.to_json())["stats"]["rows_per_s"] == 123.0  # unknown keys are kept, not dropped


def test_a_count_that_disagrees_with_the_shards_is_a_problem():
    doc = json.loads(OLD.read_text())
    m = Manifest.model_validate(doc)
    assert count_problems(m, m.rows) == []
    doc["counts"]["rows"] += 1
    found = count_problems(Manifest.model_validate(doc), m.rows)
    assert found == [f"parts hold {m.rows} rows, manifest says {m.rows + 1}"]
    doc["counts"]["input_rows"] += 2
    assert "were read" in count_problems(Manifest.model_validate(doc), m.rows)[-1]


def test_source_columns_decide_whether_a_parent_s_file_states_can_be_reused():
    from embray.config import SourceConfig

    m = Manifest.model_validate_json(OLD.read_bytes())
    cols = {"id_column": "id", "text_column": "text", "updated_at_column": m.source.updated_at_column}
    same = SourceConfig(uri=m.source.uri, **cols)
    assert m.source.reads_like(same)
    assert not m.source.reads_like(same.model_copy(update={"text_column": "body"}))
    older = _older(source={"uri", "id_column", "text_column", "files", "digest", "id_type"})
    assert not older.source.reads_like(same)  # built before updated_at_column was recorded: read the files again


def test_kinds_and_actions_print_as_their_values():
    assert f"{BuildKind.MIGRATE}" == "migrate" and str(ShardAction.DELTA) == "delta"
    assert BuildKind("compact") is BuildKind.COMPACT and ShardAction.REUSED == "reused"
    with pytest.raises(ValueError):
        VersionCounts(kind="rebuild")
