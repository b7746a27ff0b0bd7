"""Helpers shared by the tests and the benchmarks: corpora, configs, version contents, STS-B.

Fixtures stay in conftest.py; everything a test or a benchmark imports lives here.
"""

from __future__ import annotations

import csv
import socket
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STSB = SHARED / "data" / "stsb" / "sts-test.csv"
WORDS = (
    "river mountain forest ocean desert valley glacier canyon meadow island volcano prairie "
    "tiger falcon salmon beetle otter heron badger lizard walrus parrot bison moth "
    "copper silver marble granite amber cobalt quartz basalt nickel zinc slate iron"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def doc_text(i: int, n_words: int = 8) -> str:
    """Deterministic text for row i: overlapping vocabularies, so nearest neighbours mean something."""
    return " ".join(WORDS[(i * 7 + j * j * 3 + (i // 5) * j) % len(WORDS)] for j in range(n_words)) + f" item{i % 97}"


def write_corpus(root, files: int = 3, rows: int = 100, *, fs=None, start: int = 0, int_ids: bool = False):
    """Write ``files`` Parquet files of ``rows`` rows each; returns the {id: text} written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    for f in range(files):
        lo = start + f * rows
        ids = list(range(lo, lo + rows)) if int_ids else [f"doc-{i:06d}" for i in range(lo, lo + rows)]
        texts = [doc_text(i) for i in range(lo, lo + rows)]
        out.update(zip(ids, texts, strict=True))
        table = pa.table({"id": ids, "text": texts})
        path = f"{str(root).rstrip('/')}/part-{f:05d}.parquet"
        if fs is None:
            Path(root).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
        else:
            with fs.open(path, "wb") as fh:
                pq.write_table(table, fh)
    return out


def write_rows(root, rows: dict, files: int = 3) -> None:
    """Rewrite the corpus under ``root`` as ``files`` Parquet files holding exactly ``rows``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for old in root.glob("*.parquet"):
        old.unlink()
    root.mkdir(parents=True, exist_ok=True)
    items = sorted(rows.items())
    for f in range(files):
        part = items[f::files]
        pq.write_table(
            pa.table({"id": [i for i, _ in part], "text": [t for _, t in part]}), root / f"part-{f:05d}.parquet"
        )


def write_with_times(root, rows: dict, times: dict, files: int = 2) -> None:
    """Rewrite the corpus with an ``updated_at`` column (naive millisecond timestamps, read as UTC)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for old in root.glob("*.parquet"):
        old.unlink()
    items = sorted(rows.items())
    for f in range(files):
        part = items[f::files]
        pq.write_table(
            pa.table(
                {
                    "id": [i for i, _ in part],
                    "text": [t for _, t in part],
                    "updated_at": pa.array([times[i].replace(tzinfo=None) for i, _ in part], pa.timestamp("ms")),
                }
            ),
            root / f"part-{f:05d}.parquet",
        )


TENANTS = ("acme", "globex", "initech")


def row_number(row_id) -> int:
    """The number in a test row's id (``doc-000042`` -> 42, ``new-0003`` -> 3)."""
    return int("".join(c for c in str(row_id) if c.isdigit()) or 0)


def add_columns(root) -> None:
    """Give every Parquet file under ``root`` metadata columns derived from each row's id: ``tenant`` (one of
    TENANTS) and ``n`` (the id's number)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in sorted(Path(root).glob("*.parquet")):
        t = pq.read_table(path)
        nums = [row_number(i) for i in t.column("id").to_pylist()]
        t = t.append_column("tenant", pa.array([TENANTS[n % 3] for n in nums]))
        pq.write_table(t.append_column("n", pa.array(nums, pa.int64())), path)


def mutate(rows: dict, n_insert: int, n_update: int, n_delete: int) -> tuple[dict, set, set, set]:
    """A changed copy of ``rows``: (rows, inserted ids, updated ids, deleted ids)."""
    ids = sorted(rows)
    updated = set(ids[1 : 1 + 3 * n_update : 3])
    deleted = set(ids[2 : 2 + 3 * n_delete : 3])
    out = {i: t for i, t in rows.items() if i not in deleted}
    for i in updated:
        out[i] = rows[i] + " revised edition"
    inserted = {f"new-{j:04d}" for j in range(n_insert)}
    for j, i in enumerate(sorted(inserted)):
        out[i] = doc_text(50_000 + j) + " fresh"
    return out, inserted, updated, deleted


def make_config(tmp_path, **over):
    """A validated Config for a hash-backend collection under tmp_path; keyword args override sections."""
    from embray.config import parse_config

    data = {
        "collection": "docs",
        "source": {"uri": str(tmp_path / "corpus")},
        "store": {"uri": str(tmp_path / "store")},
        "model": {"backend": "hash", "name": "words", "dims": 64},
        "index": {"metric": "cos", "dtype": "f16", "shards": 3},
        "embed": {"batch_size": 128, "actors": 1, "num_cpus": 1},
    }
    for key, value in over.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return parse_config(data, base_dir=tmp_path)


def content(cfg, version: str) -> dict:
    """id -> (content_hash, vector) of a committed version, read from its manifest's files."""
    from embray.lifecycle.versions import read_manifest
    from embray.storage.segments import ShardFiles, live_rows
    from embray.storage.store import Store

    store = Store(cfg.store.uri, cfg.store.storage_options)
    m = read_manifest(store, cfg.collection, version)
    out = {}
    for s in m.shards:
        part = live_rows(store, ShardFiles.of(m, s), ["id", "key", "content_hash", "vector"])  # less tombstones
        if part is None or part.num_rows == 0:
            continue
        vecs = np.stack(part.column("vector").to_numpy(zero_copy_only=False))
        for i, h, v in zip(part.column("id").to_pylist(), part.column("content_hash").to_pylist(), vecs, strict=True):
            out[i] = (h, v)
    return out


def assert_same_content(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0], k
        np.testing.assert_array_equal(a[k][1], b[k][1])


def read_stsb() -> tuple[list[float], list[str], list[str]]:
    """The STS benchmark test split: (gold scores, left sentences, right sentences)."""
    gold, left, right = [], [], []
    with open(STSB, newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 7:
                gold.append(float(row[4]))
                left.append(row[5])
                right.append(row[6])
    assert len(gold) > 1000
    return gold, left, right


def stsb_spearman(embedder) -> float:
    """Spearman correlation of an embedder's cosine with the STS-B gold scores."""
    from scipy.stats import spearmanr

    gold, left, right = read_stsb()
    a, b = embedder.embed_documents(left), embedder.embed_documents(right)
    return spearmanr(np.sum(a * b, axis=1), gold).statistic


# --- offline corpora for quality and throughput: man pages (prose documentation) and stdlib docstrings --------

MAN_ROOT = Path("/usr/share/man")
_ROFF_ESCAPES = [
    (r"\\f(\[[^]]*\]|\(..|.)", ""),  # font changes
    (r"\\[/,&:%|^]", ""),  # spacing hints and zero-width marks
    (r"\\\((..)", " "),  # special characters
    (r"\\\*(\[[^]]*\]|\(..|.)", ""),  # strings
    (r"\\s[-+]?\d+", ""),  # size changes
    (r"\\-", "-"),
    (r"\\e", "\\\\"),
    (r'\\"', ""),
]


def _roff_text(src: str) -> tuple[str, str]:
    """(NAME description, body text) of a man page's roff source; a plain reading, no formatter needed."""
    import re

    lines, name, section = [], "", ""
    for raw in src.splitlines():
        line = raw
        for pat, rep in _ROFF_ESCAPES:
            line = re.sub(pat, rep, line)
        if line.startswith((".", "'")):
            macro, _, args = line[1:].partition(" ")
            if macro == "SH":
                section = args.strip().strip('"').upper()
                continue
            if macro not in ("B", "I", "BR", "IR", "RB", "BI", "IB", "RI", "SS", "IP", "TP", "Nm", "Nd"):
                continue
            line = args.replace('"', "")
        line = line.strip()
        if not line:
            continue
        if section == "NAME":
            name = f"{name} {line}".strip()
        elif section and section != "SYNOPSIS":
            lines.append(line)
    description = name.split(" - ", 1)[1].strip() if " - " in name else ""
    return description, " ".join(" ".join(lines).split())


def man_pages(n: int, min_chars: int = 800) -> list[tuple[str, str, str]]:
    """Up to ``n`` man pages of sections 1 and 8 as (name, NAME description, body), a stable spread chosen by
    a hash of the page's file name; links, pages with a short body or a description seen before, and the
    generated near-duplicate gcloud pages are left out."""
    import gzip
    import hashlib

    files = sorted(p for s in ("man1", "man8") for p in (MAN_ROOT / s).glob("*.gz"))
    files.sort(key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    out, seen = [], set()
    for path in files:
        try:
            src = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
        except (OSError, EOFError):
            continue
        if src.startswith(".so ") or path.name.startswith("gcloud"):  # a link; generated near-duplicates
            continue
        description, body = _roff_text(src)
        if len(description) < 12 or len(body) < min_chars or description.lower() in seen:
            continue
        seen.add(description.lower())
        out.append((path.name.split(".")[0], description, body))
        if len(out) == n:
            break
    return out


def docstring_pages(n: int, min_chars: int = 200) -> list[tuple[str, str, str]]:
    """Up to ``n`` stdlib API docstrings as (qualified name, summary line, the rest), from the demo's collection;
    docstrings whose summary is a signature or whose rest is short are left out."""
    from embray.demo import collect

    out, seen = [], set()
    for name, doc in collect(100_000).items():
        summary, _, rest = doc.partition("\n")
        summary, rest = summary.strip(), " ".join(rest.split())
        if "(" in summary.split(" ", 1)[0] or len(summary) < 20 or len(rest) < min_chars or summary in seen:
            continue
        seen.add(summary)
        out.append((name, summary, rest))
    out.sort(key=lambda p: __import__("hashlib").sha256(p[0].encode()).hexdigest())
    return out[:n]


def known_item_recall(embedder, pages: list[tuple[str, str, str]], k: int = 10) -> float:
    """Known-item recall@k: each page's summary (title line) as the query, its body as the document to find,
    exact cosine search over all bodies."""
    docs = embedder.embed_documents([body for _, _, body in pages])
    queries = embedder.embed_queries([summary for _, summary, _ in pages])
    scores = queries @ docs.T
    own = scores[np.arange(len(pages)), np.arange(len(pages))]
    rank = (scores > own[:, None]).sum(axis=1)  # pages scoring strictly better than the right one
    return float((rank < k).mean())


def wait_for(what: str, check, timeout: float = 90.0, every: float = 0.3):
    """``check()``'s first truthy value, asked every ``every`` seconds; fails naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def filter_trees(leaves):
    """A hypothesis strategy of filters: ``leaves`` (a strategy of single-column filters) combined by
    ``$and``, ``$or`` and ``$not``, up to 6 leaves."""
    from hypothesis import strategies as st

    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"$and": xs}),
            st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"$or": xs}),
            inner.map(lambda x: {"$not": x}),
        ),
        max_leaves=6,
    )
