"""Keyword (BM25) index and reciprocal rank fusion: embray.keywords, no Ray."""

from __future__ import annotations

import math
import pickle
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embray.keywords import (
    HYBRID_DEPTH,
    K1,
    RRF_K0,
    B,
    KeywordIndex,
    build_keyword_index,
    fuse_hybrid,
    fuse_rrf,
    tokenize,
)

DOCS = [
    "Vec::retain keeps only the elements specified by the predicate",
    "Vec::push appends an element to the back of a collection; retaining order",
    "os.path.join joins one or more path components intelligently",
    "The connection was reset by the peer: ERR_CONN_RESET in the browser",
    "ERR_CONN_REFUSED means the connection was refused by the server",
    "encode the string as utf-8 bytes before writing to the socket",
    "build wheels for x86_64 and aarch64 Linux",
    "HTTP/2 multiplexes streams over one TCP connection",
    "the the the the the the the the",
    "naïve café in Straße, 東京都に住む, हिन्दी भाषा",
]


def _build(tmp_path, texts, keys=None, name="kw.bin"):
    keys = np.arange(10, 10 + 3 * len(texts), 3, dtype=np.uint64) if keys is None else keys
    path = str(tmp_path / name)
    build_keyword_index(keys, texts, path)
    return KeywordIndex.open(path), keys


def _brute(texts, keys, query, rows=None):
    """BM25 (Lucene variant, corpus statistics of all rows) of every row in ``rows``, straight from the formula."""
    docs = [tokenize(t) for t in texts]
    n = len(docs)
    avgdl = sum(map(len, docs)) / n
    df = Counter(t for d in docs for t in set(d))
    terms = list(dict.fromkeys(tokenize(query)))
    out = []
    for r in range(n) if rows is None else rows:
        tf = Counter(docs[r])
        s = 0.0
        for t in terms:
            if tf[t]:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                s += idf * tf[t] / (tf[t] + K1 * (1 - B + B * len(docs[r]) / avgdl))
        if s > 0:
            out.append((int(keys[r]), s))
    return sorted(out, key=lambda ks: (-ks[1], ks[0]))


def _keys_of(hits):
    return [k for k, _ in hits]


@pytest.mark.parametrize(
    "text,expect",
    [
        ("ERR_CONN_RESET", ["err_conn_reset", "err", "conn", "reset"]),
        ("Vec::retain", ["vec::retain", "vec", "retain"]),
        ("os.path.join", ["os.path.join", "os", "path", "join"]),
        ("utf-8", ["utf-8", "utf", "8"]),
        ("x86_64", ["x86_64", "x86", "64"]),
        ("HTTP/2", ["http/2", "http", "2"]),
        ("getElementById", ["getelementbyid", "get", "element", "by", "id"]),
        ("Hello, World! -- ...", ["hello", "world"]),
        ("Straße ÉCOLE", ["strasse", "école"]),
        ("東京都", ["東京都", "東京", "京都"]),
    ],
)
def test_tokenize(text, expect):
    assert tokenize(text) == expect


def test_tokenize_drops_only_punctuation():
    assert tokenize("... --- !!! ::") == []
    assert tokenize("a + b = c") == ["a", "b", "c"]


@pytest.mark.parametrize(
    "query,best",
    [
        ("Vec::retain", 0),
        ("retain", 0),
        ("ERR_CONN_RESET", 3),
        ("os.path.join", 2),
        ("join", 2),
        ("utf-8", 5),
        ("x86_64", 6),
        ("HTTP/2", 7),
        ("café", 9),
        ("東京", 9),
        ("हिन्दी", 9),
    ],
)
def test_identifier_ranks_first(tmp_path, query, best):
    ki, keys = _build(tmp_path, DOCS)
    hits = ki.search([query], 3)[0]
    assert hits and hits[0][0] == int(keys[best])


def test_exact_identifier_beats_its_parts(tmp_path):
    texts = [
        "conn reset err err conn reset",  # all the parts, more often
        "ERR_CONN_RESET",
        "connection error, reset the device",
    ]
    ki, keys = _build(tmp_path, texts)
    assert ki.search(["ERR_CONN_RESET"], 3)[0][0][0] == int(keys[1])


def test_bm25_rarer_term_scores_higher(tmp_path):
    texts = ["apple banana", "apple cherry", "apple date", "kiwi fig"]
    ki, keys = _build(tmp_path, texts)
    apple = dict(ki.search(["apple"], 10)[0])
    banana = dict(ki.search(["banana"], 10)[0])
    assert banana[int(keys[0])] > apple[int(keys[0])]
    assert ki.search(["apple banana"], 1)[0][0][0] == int(keys[0])


def test_bm25_longer_doc_scores_lower_with_same_tf(tmp_path):
    texts = ["needle hay", "needle hay hay hay hay hay hay hay", "other words"]
    ki, keys = _build(tmp_path, texts)
    hits = ki.search(["needle"], 10)[0]
    assert _keys_of(hits) == [int(keys[0]), int(keys[1])]
    assert hits[0][1] > hits[1][1]


def test_scores_match_the_formula(tmp_path):
    ki, keys = _build(tmp_path, DOCS)
    for q in ["connection reset", "the", "Vec::retain utf-8", "path components"]:
        got = ki.search([q], 100)[0]
        want = _brute(DOCS, keys, q)
        assert _keys_of(got) == _keys_of(want)
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5)


def test_ties_break_by_key_ascending(tmp_path):
    keys = np.array([50, 7, 30, 9], dtype=np.uint64)
    ki, _ = _build(tmp_path, ["same words", "same words", "other", "same words"], keys=keys)
    assert _keys_of(ki.search(["same"], 10)[0]) == [7, 9, 50]
    assert _keys_of(ki.search(["same"], 2)[0]) == [7, 9]


def test_allowed_and_dead_are_exact(tmp_path):
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 30))) for _ in range(3000)]
    texts[2999] = "w1 zebra"  # the one row of a small allowed set that matches, deep in a long posting list
    ki, keys = _build(tmp_path, texts)
    q = "w1 w2 w3"
    for allowed_rows in ([2999], [5, 2999, 17], list(range(0, 3000, 97)), list(range(3000))):
        allowed = np.sort(keys[allowed_rows])
        got = ki.search([q], 10, allowed=allowed)[0]
        want = _brute(texts, keys, q, rows=allowed_rows)[:10]
        assert _keys_of(got) == _keys_of(want)
        assert set(_keys_of(got)) <= set(allowed.tolist())
    dead = np.sort(keys[[r for r, _ in enumerate(texts) if "w1" in texts[r].split()][:50]])
    got = ki.search(["w1"], 100, dead=dead)[0]
    assert not set(_keys_of(got)) & set(dead.tolist())
    full = [h for h in ki.search(["w1"], 3000)[0] if h[0] not in set(dead.tolist())]
    assert got == full[:100]
    both = ki.search([q], 5, allowed=np.sort(keys[[5, 2999, 17]]), dead=np.sort(keys[[2999]]))[0]
    assert int(keys[2999]) not in _keys_of(both)


def test_allowed_keys_outside_the_part_are_ignored(tmp_path):
    ki, keys = _build(tmp_path, DOCS)
    allowed = np.array([0, 1, 2, int(keys[0]), 10**15], dtype=np.uint64)
    assert _keys_of(ki.search(["retain"], 10, allowed=allowed)[0]) == [int(keys[0])]
    assert ki.search(["retain"], 10, allowed=np.array([], dtype=np.uint64))[0] == []


def test_unsorted_filter_is_refused(tmp_path):
    ki, _ = _build(tmp_path, DOCS)
    with pytest.raises(ValueError, match="sorted"):
        ki.search(["retain"], 10, dead=np.array([5, 3], dtype=np.uint64))


def test_zero_rows(tmp_path):
    ki, _ = _build(tmp_path, [], keys=np.array([], dtype=np.uint64))
    assert len(ki) == 0
    assert ki.search(["anything", ""], 5) == [[], []]


def test_only_empty_texts(tmp_path):
    ki, _ = _build(tmp_path, ["", "...", "  "])
    assert len(ki) == 3
    assert ki.search(["x"], 5) == [[]]


def test_unknown_terms_and_empty_queries_return_nothing(tmp_path):
    ki, _ = _build(tmp_path, DOCS)
    assert ki.search(["qwertyuiop zzz", "", "!!!"], 5) == [[], [], []]


def test_k_larger_than_matches(tmp_path):
    ki, keys = _build(tmp_path, DOCS)
    hits = ki.search(["connection"], 1000)[0]
    assert sorted(_keys_of(hits)) == sorted(int(keys[i]) for i in (3, 4, 7))
    assert ki.search(["connection"], 0) == [[]]


def test_reopen_and_pickle_give_the_same_results(tmp_path):
    ki, _ = _build(tmp_path, DOCS)
    queries = ["connection reset", "Vec::retain", "東京"]
    want = ki.search(queries, 5)
    assert KeywordIndex.open(ki.path, mmap=False).search(queries, 5) == want
    assert pickle.loads(pickle.dumps(ki)).search(queries, 5) == want


def test_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        build_keyword_index(np.array([1, 1], dtype=np.uint64), ["a", "b"], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="keys for"):
        build_keyword_index(np.array([1], dtype=np.uint64), ["a", "b"], str(tmp_path / "x"))
    (tmp_path / "junk").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="not an embray keyword index"):
        KeywordIndex.open(str(tmp_path / "junk"))
    ki, _ = _build(tmp_path, DOCS)
    data = open(ki.path, "rb").read()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        KeywordIndex.open(str(tmp_path / "cut"))


def test_fuse_rrf():
    fused = fuse_rrf([["a", "b", "c"], ["b", "d"]], k0=60)
    scores = dict(fused)
    assert scores["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert scores["a"] == pytest.approx(1 / 61)
    assert scores["d"] == pytest.approx(1 / 62)
    assert [d for d, _ in fused] == ["b", "a", "d", "c"]
    assert fuse_rrf([["a", "b", "c"], ["b", "d"]], k0=60, limit=2) == fused[:2]
    assert dict(fuse_rrf([["a"]]))["a"] == pytest.approx(1 / (RRF_K0 + 1))


def test_fuse_hybrid_uses_the_shipped_defaults():
    vector = [f"v{i}" for i in range(100)]
    keyword = ["k0", "v3"]
    fused = dict(fuse_hybrid(vector, keyword))
    assert fused["k0"] == pytest.approx(3 / (RRF_K0 + 1))
    assert fused["v3"] == pytest.approx(1 / (RRF_K0 + 4) + 3 / (RRF_K0 + 2))
    assert f"v{HYBRID_DEPTH}" not in fused and f"v{HYBRID_DEPTH - 1}" in fused
    assert [d for d, _ in fuse_hybrid(vector, keyword, limit=2)] == ["v3", "k0"]


def test_fuse_rrf_weights_ties_and_duplicates():
    assert [d for d, _ in fuse_rrf([[1], [2]], weights=[1.0, 2.0])] == [2, 1]
    assert [d for d, _ in fuse_rrf([[2], [1]])] == [1, 2]  # tie: str(id) ascending
    assert dict(fuse_rrf([["x", "x", "y"]], k0=0)) == {"x": 1.0, "y": pytest.approx(1 / 3)}
    assert fuse_rrf([]) == []
    with pytest.raises(ValueError):
        fuse_rrf([["a"]], weights=[1.0, 2.0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(
        st.lists(st.sampled_from(["a", "b", "c", "d", "e", "x_y", "Vec::z", "é"]), max_size=8).map(" ".join),
        max_size=25,
    ),
    query=st.lists(st.sampled_from(["a", "b", "e", "x", "y", "z", "é", "q"]), min_size=1, max_size=3).map(" ".join),
    data=st.data(),
)
def test_allowed_equals_filtered_unrestricted_search(tmp_path_factory, texts, query, data):
    keys = np.array(data.draw(st.permutations(range(1000, 1000 + len(texts)))), dtype=np.uint64)
    path = str(tmp_path_factory.mktemp("prop") / "kw.bin")
    build_keyword_index(keys, texts, path)
    ki = KeywordIndex.open(path)
    ki.dense_ratio = data.draw(st.sampled_from([0, 8, 10**9]))  # sparse / adaptive / dense accumulation
    ki.row_ratio = data.draw(st.sampled_from([10**9, 4, 0]))  # never / adaptive / always score allowed rows
    rows = data.draw(st.sets(st.integers(0, max(0, len(texts) - 1)), max_size=len(texts)))
    allowed = np.sort(keys[sorted(rows)]) if texts else np.array([], dtype=np.uint64)
    k = len(texts) + data.draw(st.integers(0, 3))
    full = ki.search([query], k)[0]
    restricted = ki.search([query], k, allowed=allowed)[0]
    assert restricted == [h for h in full if h[0] in set(allowed.tolist())]
