import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embray.storage import rows as R


def test_shard_of_is_stable_and_spreads():
    # Fixed values: the partition must never change between releases, or old versions stop resolving ids.
    assert R.shard_of("doc-000001", 4) == R.shard_of("doc-000001", 4)
    assert [R.shard_of(i, 4) for i in ("a", "b", "c", "d")] == [R.shard_of(x, 4) for x in "abcd"]
    counts = [0] * 8
    for i in range(8000):
        counts[R.shard_of(f"id-{i}", 8)] += 1
    assert min(counts) > 850 and max(counts) < 1150
    assert R.shard_of(42, 5) == R.shard_of("42", 5)  # integer ids partition as their decimal string


def test_shard_of_matches_another_process():
    import subprocess
    import sys

    code = "from embray.storage.rows import shard_of; print([shard_of(f'x{i}', 7) for i in range(20)])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == str([R.shard_of(f"x{i}", 7) for i in range(20)])


@pytest.mark.parametrize(
    "row_id,text,reason",
    [
        ("a", "fine text", None),
        (None, "text", R.NULL_ID),
        ("a", None, R.NULL_TEXT),
        ("a", "", R.EMPTY_TEXT),
        ("a", " \n\t ", R.EMPTY_TEXT),
        ("a", 12, R.NOT_TEXT),
    ],
)
def test_reject_reason(row_id, text, reason):
    assert R.reject_reason(row_id, text) == reason


def test_digest():
    d1 = R.digest_pairs(["a", "b"], ["h1", "h2"])
    assert d1 == R.digest_pairs(["a", "b"], ["h1", "h2"])
    assert d1 != R.digest_pairs(["a", "b"], ["h1", "h3"])
    assert R.content_hash("x") != R.content_hash("x ")


def test_merge_topk_takes_smallest_distances_across_shards():
    merged = R.merge_topk([[(0.3, "a"), (0.5, "b")], [(0.1, "c")], [], [(0.4, "d")]], 3)
    assert merged == [(0.1, "c"), (0.3, "a"), (0.4, "d")]


_SPACES = " \t\n\x0b\x0c\r\x1c\x1f\x85\xa0\u1680\u2007\u200b\u2028\u3000\ufeffa"  # (and look-alikes that are not)
_TEXT = st.one_of(
    st.none(),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    st.text(alphabet=st.sampled_from(_SPACES), max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.tuples(st.one_of(st.none(), st.text(max_size=8)), _TEXT), max_size=30))
def test_the_column_rules_equal_the_row_rules(rows):
    """What the build computes over Arrow columns is, row by row, what the scalar rules say."""
    import pyarrow as pa

    ids, texts = pa.array([i for i, _ in rows], pa.string()), pa.array([t for _, t in rows], pa.string())
    reasons = [R.reject_reason(i, t) for i, t in rows]
    assert R.reject_column(ids, texts).to_pylist() == reasons
    hashes = R.content_hash_column(texts, [r is None for r in reasons])
    assert hashes == [R.content_hash(t) if r is None else None for (_, t), r in zip(rows, reasons, strict=True)]
    assert R.shard_column(ids, 5).tolist() == [R.shard_of(i, 5) if i is not None else 0 for i, _ in rows]
    good = [(i, h) for (i, _), h in zip(rows, hashes, strict=True) if i is not None and h is not None]
    good_ids, good_hashes = [i for i, _ in good], [h for _, h in good]
    digest = R.digest_column(pa.array(good_ids, pa.string()), pa.array(good_hashes, pa.string()))
    assert digest == R.digest_pairs(good_ids, good_hashes)


def test_the_column_rules_take_integer_ids_and_sliced_columns():
    import pyarrow as pa

    ids = pa.array([7, -3, None, 10**15], pa.int64())
    assert R.shard_column(ids, 4).tolist() == [R.shard_of(7, 4), R.shard_of(-3, 4), 0, R.shard_of(10**15, 4)]
    texts = pa.array(["x", "hello", " ", "z"]).slice(1, 3)  # an offset into the buffers, as a record batch's slice
    assert R.content_hash_column(texts) == [R.content_hash("hello"), R.content_hash(" "), R.content_hash("z")]
    assert R.reject_column(pa.array(["a", "b", "c"]), texts).to_pylist() == [None, R.EMPTY_TEXT, None]
    assert R.reject_column(pa.array(["a"]), pa.nulls(1)).to_pylist() == [R.NULL_TEXT]
    hashes = pa.array(["h1", "h2"])
    assert R.digest_column(pa.array([5, 6]), hashes) == R.digest_pairs([5, 6], ["h1", "h2"])
    assert R.digest_column(pa.array([], pa.string()), pa.array([], pa.string())) == R.digest_pairs([], [])


def test_whitespace_is_what_python_strips():
    assert set(R.WHITESPACE) == {chr(c) for c in range(0x110000) if chr(c).isspace()}
