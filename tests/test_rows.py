import pytest

from embray import rows as R


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

    code = "from embray.rows import shard_of; print([shard_of(f'x{i}', 7) for i in range(20)])"
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


def test_duplicates_and_digest():
    assert R.duplicate_ids(["a", "b", "a", None, None, "c", "a"]) == {"a": 3}
    d1 = R.digest_pairs(["a", "b"], ["h1", "h2"])
    assert d1 == R.digest_pairs(["a", "b"], ["h1", "h2"])
    assert d1 != R.digest_pairs(["a", "b"], ["h1", "h3"])
    assert R.content_hash("x") != R.content_hash("x ")


def test_merge_topk_takes_smallest_distances_across_shards():
    merged = R.merge_topk([[(0.3, "a"), (0.5, "b")], [(0.1, "c")], [], [(0.4, "d")]], 3)
    assert merged == [(0.1, "c"), (0.3, "a"), (0.4, "d")]
