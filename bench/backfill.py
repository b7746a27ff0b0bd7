"""Backfill throughput: embray's CPU backends vs plain SentenceTransformer.encode, same corpus, model and machine.

    .venv/bin/python bench/backfill.py [--docs 6000] [--long-docs 2000] [--rounds 2] [--hash-rows 100000]
                                       [--runs default,st-fp32,st-bf16,st-bf16-2x1,onnx-int8] [--write]
                                       [--isa native|avx2|avx512[,...]]

Two corpora: the demo's stdlib docstrings (short API reference) and --long-docs man pages of this machine
(prose, most past MiniLM's 256-token limit). For each, interleaved round by round in one process so that
machine noise hits all alike:
  plain        a fresh process: import, load all-MiniLM-L6-v2 and `SentenceTransformer.encode` every text in
               fp32, batch 64, all cores (what a user would write)
  default      `backfill()` as the quickstart runs it: precision bf16 (fp32 where the CPU lacks native bf16),
               embed.actors null (the layout the machine decides: embray.pipeline.layout)
  st-fp32      `backfill()` with backend sentence-transformers, fp32 (1 actor, all cores)
  st-bf16      the same with model.precision bf16 (native bf16 on AMX / AVX512-BF16 CPUs; the quickstart's)
  st-bf16-2x1  bf16 with 2 actors of 1 thread (embed.num_cpus 0.5) instead of 1 actor of 2 threads
  onnx-int8    backend onnx, dynamic int8 (one text per forward pass)
Each embray run is a whole backfill into a fresh store on a local Ray that is already up: scan and hash,
plan, embed in the actor pool (actor start and model load included), USearch shards, manifest, MLflow.
Then, once: the `hash` backend on --hash-rows rows (the pipeline's own ceiling) and STS-B of each encoder.
Each embray run's table row has its compute path and its largest embedding worker's peak RSS (VmHWM).
--isa caps the instruction set the libraries use (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY; avx2: an AVX2-only
CPU, avx512: AVX-512 without bf16, native: the machine as it is); several, comma-separated, run one after the
other, each in its own process (plain under the same cap), into one table.
Prints markdown tables of medians; --write puts them into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.helpers: the corpora and STS-B, shared with the tests
MARK_BEGIN = "<!-- bench/backfill.py begin -->"
MARK_END = "<!-- bench/backfill.py end -->"


def write_section(begin: str, end: str, text: str) -> None:
    """Put ``text`` (from marker ``begin`` to ``end``) into docs/benchmarks.md, in place of its earlier copy."""
    doc = ROOT / "docs" / "benchmarks.md"
    old = doc.read_text() if doc.exists() else "# Benchmarks\n\nRun by hand; each section names its command.\n"
    if begin in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1].strip("\n")
        doc.write_text(head + text + "\n" + (f"\n{tail}\n" if tail else ""))
    else:
        doc.write_text(old.rstrip("\n") + "\n\n" + text + "\n")


def machine() -> str:
    cpu, flags = "unknown CPU", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown CPU":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:  # the vector instruction sets a timing depends on
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "f16c"))]
    except OSError:
        pass
    import torch

    return (
        f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), no GPU; "
        f"CPU flags: {' '.join(flags) or 'unknown'}"
    )


_PLAIN = """
import json, sys, time
t0 = time.perf_counter()
import pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer
from embray.models import ModelSpec, resolve_model_path
texts = pq.read_table(sys.argv[1]).column("text").to_pylist()
model = SentenceTransformer(str(resolve_model_path(ModelSpec())), device="cpu", local_files_only=True)
t1 = time.perf_counter()
model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
t2 = time.perf_counter()
print(json.dumps({"total": t2 - t0, "encode": t2 - t1}))
"""


def plain_encode(corpus: Path) -> tuple[float, float]:
    """A plain script in a fresh process: import, load the model, encode every text. (total s, encode-only s)"""
    import json

    out = subprocess.run([sys.executable, "-c", _PLAIN, str(corpus)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["total"], r["encode"]


EMBEDDED: list[int] = []  # texts each embray backfill sent to the model
WORKERS: list[tuple[str, float | None]] = []  # each embray backfill's compute path and workers' peak RSS (MiB)
ISA = {  # --isa: (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY)
    "avx2": ("AVX2", "avx2"),
    "avx512": ("AVX512_CORE", "avx512"),
    "native": (None, None),
}


def embray_backfill(cfg) -> float:
    from embray import Collection

    t = time.perf_counter()
    result = Collection(cfg).backfill(promote=False)
    EMBEDDED.append(result.counts.embedded)
    WORKERS.append(("; ".join(result.embed_compute), result.embed_worker_peak_rss_mib))
    return time.perf_counter() - t


RUNS = {  # name: (what the table calls it, model settings, embed settings)
    "default": (
        "embray default (quickstart: bf16 spec, layout by the machine)",
        {"backend": "sentence-transformers", "precision": "bf16"},
        {"actors": None},
    ),
    "st-fp32": ("embray, sentence-transformers fp32", {"backend": "sentence-transformers"}, {}),
    "st-bf16": (
        "embray, sentence-transformers bf16 (quickstart)",
        {"backend": "sentence-transformers", "precision": "bf16"},
        {},
    ),
    "st-bf16-2x1": (
        "embray, bf16, 2 actors x 1 thread",
        {"backend": "sentence-transformers", "precision": "bf16"},
        {"actors": 2, "num_cpus": 0.5, "threads": 1},
    ),
    "onnx-int8": ("embray, onnx int8 (dynamic, one text per pass)", {"backend": "onnx"}, {}),
}


def write_long_docs(out: Path, n: int, files: int = 8) -> int:
    """--long-docs man pages (tests/helpers.man_pages) as a Parquet corpus; returns the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers import man_pages

    pages = man_pages(n)
    out.mkdir(parents=True)
    for f in range(files):
        part = pages[f::files]
        pq.write_table(pa.table({"id": [p[0] for p in part], "text": [p[2] for p in part]}), out / f"part-{f}.parquet")
    return len(pages)


def stsb_scores(runs: list[str]) -> dict[str, float]:
    """STS-B Spearman of each run's encoder (plain = sentence-transformers fp32), in this process."""
    from embray.models import ModelSpec, load_embedder
    from tests.helpers import STSB, stsb_spearman

    if not STSB.exists():
        return {}
    out = {"plain": stsb_spearman(load_embedder(ModelSpec(device="cpu")))}
    for name in runs:
        out[name] = stsb_spearman(load_embedder(ModelSpec(**RUNS[name][1])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=6000)
    ap.add_argument("--long-docs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hash-rows", type=int, default=100_000, help="0: leave the hash run out")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="embed.batch_size (rows per actor call); a job of more than 4 batches goes through the actor pool",
    )
    ap.add_argument("--runs", default=",".join(RUNS), help=f"embray runs, comma-separated, of: {', '.join(RUNS)}")
    ap.add_argument("--write", action="store_true", help="write the tables into docs/benchmarks.md")
    ap.add_argument("--isa", default="native", help=f"instruction-set tiers, comma-separated, of: {', '.join(ISA)}")
    args = ap.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    if unknown := set(runs) - set(RUNS):
        ap.error(f"unknown --runs {sorted(unknown)}; choose from {', '.join(RUNS)}")
    tiers = [t for t in args.isa.split(",") if t]
    if unknown := set(tiers) - set(ISA):
        ap.error(f"unknown --isa {sorted(unknown)}; choose from {', '.join(ISA)}")
    if len(tiers) > 1:
        return by_tier(tiers, args)
    for var, value in zip(("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"), ISA[tiers[0]], strict=True):
        if value:
            os.environ[var] = value  # before torch loads, here and in the Ray workers and plain's process

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from embray.config import parse_config
    from embray.demo import write_demo
    from embray.models import ModelSpec, load_embedder

    tmp = Path(tempfile.mkdtemp(prefix="embray-bench-"))
    os.environ["EMBRAY_CACHE"] = str(tmp / "cache")  # the onnx export is made once, below, before the rounds
    _, n = write_demo(tmp / "demo", docs=args.docs, files=8)
    texts = pq.read_table(tmp / "demo" / "corpus").column("text").to_pylist()
    corpora = {"docstrings": (tmp / "demo" / "corpus", n)}
    if args.long_docs:
        corpora["man pages"] = (tmp / "long", write_long_docs(tmp / "long", args.long_docs))
    mean_chars = {
        name: statistics.mean(len(t) for t in pq.read_table(path).column("text").to_pylist())
        for name, (path, _) in corpora.items()
    }
    big = tmp / "big"  # the docstrings repeated under new ids, up to --hash-rows rows, in 16 files
    big.mkdir()
    reps = -(-args.hash_rows // n)
    ids = [f"{r}:{i}" for r in range(reps) for i in range(n)][: args.hash_rows]
    body = [f"{t} [{k}]" for k, t in enumerate((texts * reps)[: args.hash_rows])]  # unique: no cache hits
    for f in range(16 if args.hash_rows else 0):
        pq.write_table(pa.table({"id": ids[f::16], "text": body[f::16]}), big / f"part-{f:02d}.parquet")

    def cfg(name: str, source: Path, model: dict, embed: dict | None = None, store: str = "store"):
        return parse_config(
            {
                "collection": name,
                "source": {"uri": str(source)},
                "store": {"uri": str(tmp / store)},
                "mlflow": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db"},  # one database, created by the warmup
                "model": model,
                "index": {"shards": 4},
                # one vector per row, as plain encode makes: the same texts (truncated at the model's window),
                # so the ratio compares the same work; chunking embeds ~12x the texts of a long page (issue 27)
                "chunk": "none",
                # keep_warm_s 0: every run loads its model (no warm actor from an earlier run holds one, or a CPU)
                "embed": {"batch_size": args.batch_size, "actors": 1, "num_cpus": 1, "keep_warm_s": 0, **(embed or {})},
            },
            base_dir=tmp,
        )

    if "onnx-int8" in runs:
        load_embedder(ModelSpec(backend="onnx"))  # export and quantise once; the rounds measure using it
    torch_runs = [RUNS[r][1] for r in runs if RUNS[r][1]["backend"] == "sentence-transformers"]
    for precision in {model.get("precision", "fp32") for model in torch_runs}:
        # the fused CPU graph is traced and cached once per machine (embray.models.cpu_graph), as the first
        # backfill with the model on a machine does; the rounds measure loading it
        load_embedder(ModelSpec(device="cpu", precision=precision))
    hashed = cfg("bench-hash", big, {"backend": "hash", "name": "words", "dims": 384})
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    embray_backfill(cfg("warmup", corpora["docstrings"][0], {"backend": "hash", "dims": 64}))  # Ray's workers
    EMBEDDED.clear()
    secs: dict[tuple[str, str], list[float]] = {}
    embedded: dict[tuple[str, str], int] = {}
    workers: dict[tuple[str, str], tuple[str, float | None]] = {}
    for r in range(args.rounds):
        for corpus, (source, _) in corpora.items():
            secs.setdefault((corpus, "plain"), []).append(plain_encode(source)[0])
            for name in runs:
                _, model, embed = RUNS[name]
                c = cfg(f"bench-{name}", source, model, embed, store=f"store-{corpus}-{name}-{r}")  # fresh store
                secs.setdefault((corpus, name), []).append(embray_backfill(c))
                embedded[(corpus, name)] = EMBEDDED[-1]
                how, rss = WORKERS[-1]
                before = workers.get((corpus, name), ("", None))[1] or 0.0
                workers[(corpus, name)] = (how.split(" (")[0], max(rss or 0.0, before) or None)
                print(f"  {corpus}, {name}: {how}", file=sys.stderr, flush=True)
            done = ", ".join(f"{k[1]} {v[-1]:.1f}s" for k, v in secs.items() if k[0] == corpus)
            print(
                f"round {r + 1}, {corpus}: {done}",
                file=sys.stderr,
                flush=True,
            )
    hash_s = embray_backfill(hashed) if args.hash_rows else None
    ray.shutdown()
    stsb = stsb_scores(runs)
    import torch

    tier = f"{tiers[0]} (torch: {torch.backends.cpu.get_cpu_capability()})"
    med = statistics.median
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    table = [
        MARK_BEGIN,
        "## Backfill throughput",
        "",
        f"Command: `.venv/bin/python bench/backfill.py --docs {args.docs} --long-docs {args.long_docs} "
        f"--rounds {args.rounds} --hash-rows {args.hash_rows} --batch-size {args.batch_size} --runs {','.join(runs)} "
        f"--isa {tiers[0]}` (commit {commit.stdout.strip() or '?'})",
        "",
        f"Machine: {machine()}.",
        "",
        "Corpora: "
        + "; ".join(
            f"*{name}*, {rows} rows (mean {mean_chars[name]:.0f} characters) in 8 Parquet files"
            for name, (_, rows) in corpora.items()
        )
        + ". The docstrings repeat (embray embeds each distinct text once per shard, plain encode every row); the "
        "man pages are unique and mostly past MiniLM's 256-token limit. *plain* is a fresh process (import, "
        "load MiniLM, `SentenceTransformer.encode` every row in fp32, batch 64, all cores); each embray run is "
        "a whole backfill into a fresh store (actor start and model load included, 4 shards, embed.batch_size "
        f"{args.batch_size}) on a Ray started once. Medians of {args.rounds} interleaved rounds; the ratio is "
        "per corpus row, plain's seconds over the run's. STS-B: Spearman on the test split (published 0.8203).",
        "",
        "| isa | corpus | run | rows | seconds (median) | rows/s | vs plain | texts embedded | compute | "
        "worker peak RSS | STS-B |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for corpus, (_, rows) in corpora.items():
        plain = med(secs[(corpus, "plain")])
        for name in ["plain", *runs]:
            s_ = med(secs[(corpus, name)])
            label = "plain `SentenceTransformer.encode` script" if name == "plain" else RUNS[name][0]
            score = f"{stsb[name]:.4f}" if name in stsb else ""
            how, rss = workers.get((corpus, name), ("", None))
            table.append(
                f"| {tier} | {corpus} | {label} | {rows} | {s_:.1f} | {rows / s_:.1f} | {plain / s_:.2f}x "
                f"| {embedded.get((corpus, name), rows)} | {how} | {f'{rss:.0f} MiB' if rss else ''} | {score} |"
            )
    table += ["", "Per round (seconds): "]
    for (corpus, name), v in secs.items():
        table.append(f"- {corpus}, {name}: " + ", ".join(f"{x:.1f}" for x in v))
    if hash_s is not None:
        table += [
            "",
            f"Pipeline ceiling: the `hash` backend (no model) backfills {args.hash_rows} rows (the docstrings made "
            f"unique, 16 files) in {hash_s:.1f} s, {args.hash_rows / hash_s:.0f} rows/s (one run), most of it HNSW "
            "shard building.",
        ]
    table.append(MARK_END)
    text = "\n".join(table)
    print(text)
    if args.write:
        write_section(MARK_BEGIN, MARK_END, text)


def by_tier(tiers: list[str], args) -> None:
    """Run this script once per tier, each in its own process (a cap must be set before torch loads, in the
    driver, its Ray workers and plain's process), and put their tables together."""
    rows, head = [], []
    for tier in tiers:
        argv = [sys.executable, __file__, "--isa", tier, "--docs", str(args.docs), "--long-docs", str(args.long_docs)]
        argv += ["--rounds", str(args.rounds), "--batch-size", str(args.batch_size), "--runs", args.runs]
        argv += ["--hash-rows", str(args.hash_rows if tier == tiers[0] else 0)]
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"--isa {tier} failed:\n{out.stderr[-4000:]}")
        lines = out.stdout.split(MARK_BEGIN, 1)[1].split(MARK_END, 1)[0].strip().splitlines()
        rows += [ln for ln in lines if ln.startswith(f"| {tier}")]
        keep = [ln for ln in lines if not ln.startswith(("| ", "- ", "Per round")) or ln.startswith(("| isa", "| ---"))]
        head = head or keep
        print(f"--isa {tier} done", file=sys.stderr, flush=True)
    at = head.index(next(ln for ln in head if ln.startswith("| ---"))) + 1
    text = "\n".join([MARK_BEGIN, *head[:at], *rows, *head[at:], MARK_END]).replace(
        f"--isa {tiers[0]}`", f"--isa {','.join(tiers)}`"
    )
    print(text)
    if args.write:
        write_section(MARK_BEGIN, MARK_END, text)


if __name__ == "__main__":
    main()
