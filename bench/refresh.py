"""Refresh cost: a refresh after a 1% change vs a full backfill of the same corpus, same machine, one run;
and the same refresh cold (the model loaded for it) vs warm (embed.keep_warm_s: the model already loaded).

    .venv/bin/python bench/refresh.py [--rows 100000] [--minilm-docs 6000] [--rounds 3] [--write]

For each model (the `hash` backend on --rows rows; MiniLM on --minilm-docs stdlib docstrings):
  backfill      a full build of the corpus into a fresh store
  mutate        1% of the rows: 0.4% inserted, 0.4% updated, 0.2% deleted (new texts are unique)
  refresh       the child version of that backfill, cold: no warm actor on this Ray (released before it), so
                it loads the model (in the warm actor it makes; --keep-warm-s 0: in a plain task)
  mutate again  another 1%
  warm refresh  the grandchild, back to back: the warm actor of the refresh above embeds it
Reports rows embedded / rows changed (must be exactly 1.0), refresh time / backfill time (target <= 0.1) and
warm / cold refresh time, medians over rounds; Ray is started once. --write puts the table into
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import ROOT, machine, write_section  # noqa: E402 - the sibling benchmark's helpers

MARK_BEGIN = "<!-- bench/refresh.py begin -->"
MARK_END = "<!-- bench/refresh.py end -->"


def write_corpus(root: Path, rows: dict, files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for old in root.glob("*.parquet"):
        old.unlink()
    root.mkdir(parents=True, exist_ok=True)
    items = list(rows.items())
    for f in range(files):
        part = items[f::files]
        pq.write_table(pa.table({"id": [i for i, _ in part], "text": [t for _, t in part]}), root / f"p{f:03d}.parquet")


def mutate(rows: dict, fraction: float, seed: int) -> tuple[dict, int, int]:
    """Insert, update and delete ``fraction`` of the rows (40/40/20); returns (rows, changed+new, deleted)."""
    import random

    rng = random.Random(seed)
    n = round(len(rows) * fraction)
    n_ins, n_upd = round(n * 0.4), round(n * 0.4)
    n_del = n - n_ins - n_upd
    ids = list(rows)
    picked = rng.sample(ids, n_upd + n_del)
    out = dict(rows)
    for i in picked[:n_upd]:
        out[i] = f"{rows[i]} (revised {seed}-{i})"
    for i in picked[n_upd:]:
        del out[i]
    for j in range(n_ins):
        out[f"ins-{seed}-{j}"] = f"{rows[ids[j]]} (inserted {seed}-{j})"
    return out, n_ins + n_upd, n_del


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--minilm-docs", type=int, default=6000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--minilm-rounds", type=int, default=2)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--keep-warm-s", type=float, default=300.0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray

    from embray import Collection
    from embray.config import parse_config
    from embray.demo import write_demo
    from embray.pipeline.warm import release_warm

    tmp = Path(tempfile.mkdtemp(prefix="embray-bench-refresh-"))
    _, n = write_demo(tmp / "demo", docs=args.minilm_docs, files=8)
    docs = pq.read_table(tmp / "demo" / "corpus").to_pydict()
    # Unique texts, so that "embedded" counts exactly the changed rows.
    minilm_rows = {i: f"{t} [{i}]" for i, t in zip(docs["id"], docs["text"], strict=True)}
    hash_rows = {f"h{k:07d}": f"{docs['text'][k % n]} [{k}]" for k in range(args.rows)}

    def cfg(name: str, model: dict, r: int):
        return parse_config(
            {
                "collection": f"{name}{r}",
                "source": {"uri": str(tmp / f"{name}-corpus")},
                "store": {"uri": str(tmp / f"store-{name}-{r}")},
                "mlflow": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db"},  # one database, created before timing
                "model": model,
                "index": {"shards": args.shards},
                "embed": {"batch_size": 512, "actors": 1, "num_cpus": 1, "keep_warm_s": args.keep_warm_s},
            },
            base_dir=tmp,
        )

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    from embray.lifecycle.registry import Registry

    Registry(cfg("warmup", {"backend": "hash", "name": "words", "dims": 8}, 0)).experiment_id()  # create the DB
    results = []
    for label, name, model, base, rounds in (
        ("hash", "hash", {"backend": "hash", "name": "words", "dims": 384}, hash_rows, args.rounds),
        ("MiniLM", "minilm", {"backend": "sentence-transformers"}, minilm_rows, args.minilm_rounds),
    ):
        if rounds == 0:
            continue
        full_s, ref_s, ratio_emb, stats, warm_s, warm_stats = [], [], [], [], [], []
        estimated = []  # (build, MLflow metrics): the estimate logged beside the actual
        for r in range(rounds):
            c = Collection(cfg(name, model, r))
            write_corpus(tmp / f"{name}-corpus", base, files=16 if label == "hash" else 8)
            t = time.perf_counter()
            c.backfill()
            full_s.append(time.perf_counter() - t)
            changed, n_changed, n_deleted = mutate(base, 0.01, seed=r)
            write_corpus(tmp / f"{name}-corpus", changed, files=16 if label == "hash" else 8)
            release_warm("bench: the first refresh of a round is cold")
            t = time.perf_counter()
            res = c.refresh()
            ref_s.append(time.perf_counter() - t)
            s = res.to_dict()
            assert s["new"] + s["changed"] == n_changed and s["deleted"] == n_deleted, s
            ratio_emb.append(s["embedded"] / n_changed)
            stats.append(res.manifest.stats)
            estimated.append(("refresh (cold)", c.registry.client.get_run(res.manifest.mlflow_run_id).data.metrics))
            again, n_again, _ = mutate(changed, 0.01, seed=1000 + r)
            write_corpus(tmp / f"{name}-corpus", again, files=16 if label == "hash" else 8)
            t = time.perf_counter()
            warm = c.refresh()
            warm_s.append(time.perf_counter() - t)
            assert warm.counts.embedded == n_again, warm.to_dict()
            warm_stats.append(warm.manifest.stats)
            estimated.append(("refresh (warm)", c.registry.client.get_run(warm.manifest.mlflow_run_id).data.metrics))
            print(
                f"{label} round {r + 1}: backfill {full_s[-1]:.1f}s, refresh {ref_s[-1]:.1f}s "
                f"(embedded {s['embedded']} of {n_changed} changed; stages {res.manifest.stats}), "
                f"warm refresh {warm_s[-1]:.1f}s (stages {warm.manifest.stats})",
                file=sys.stderr,
                flush=True,
            )
        med = statistics.median
        results.append(
            (
                label,
                len(base),
                n_changed,
                n_deleted,
                ratio_emb,
                med(full_s),
                med(ref_s),
                [f / rr for f, rr in zip(ref_s, full_s, strict=True)],
                stats,
                warm_s,
                warm_stats,
                estimated,
            )
        )
    ray.shutdown()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    lines = [
        MARK_BEGIN,
        "## Refresh after a 1% change vs a full backfill",
        "",
        f"Command: `.venv/bin/python bench/refresh.py --rows {args.rows} --minilm-docs {args.minilm_docs} "
        f"--rounds {args.rounds} --minilm-rounds {args.minilm_rounds} --shards {args.shards} "
        f"--keep-warm-s {args.keep_warm_s:g}` "
        f"(commit {commit.stdout.strip() or '?'})",
        "",
        f"Machine: {machine()}.",
        "",
        "Each round: backfill into a fresh store, then change 1% of the rows (0.4% inserted, 0.4% updated, "
        "0.2% deleted) and refresh. Texts are unique, so rows embedded / rows changed must be exactly 1.0. "
        "Times are wall-clock medians and include MLflow logging; Ray was started once. "
        "*refresh* is cold: no warm actor was alive (released before it), so it loads the model. *warm refresh* is "
        "another 1% change refreshed right after it, back to back: its few batches go to the warm actor the cold "
        "refresh made (`embed.keep_warm_s`), which already holds the model.",
        "",
        "| model | rows | changed (new+updated) | deleted | embedded / changed | backfill s | refresh s "
        "| refresh / backfill | warm refresh s | warm / cold |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, rows, n_changed, n_deleted, emb, full, ref, ratios, _, warm, _, _ in results:
        lines.append(
            f"| {label} | {rows} | {n_changed} | {n_deleted} | {', '.join(f'{x:.2f}' for x in emb)} | {full:.1f} "
            f"| {ref:.1f} | {statistics.median(ratios):.3f} (rounds: {', '.join(f'{x:.3f}' for x in ratios)}) "
            f"| {statistics.median(warm):.1f} (rounds: {', '.join(f'{x:.1f}' for x in warm)}) "
            f"| {statistics.median(warm) / ref:.2f} |"
        )
    lines += ["", "Refresh stages (median seconds): "]
    keys = ("plan_seconds", "embed_seconds", "shard_seconds", "seconds")
    for label, *_, stats, _, warm_stats, _ in results:
        for kind, st in (("cold", stats), ("warm", warm_stats)):
            lines.append(
                f"- {label}, {kind}: "
                + ", ".join(f"{k.replace('_seconds', '')} {statistics.median(s[k] for s in st):.2f}" for k in keys)
            )
    lines += [
        "",
        "Estimate vs actual: what each refresh's dry-run estimate (`embray refresh --dry-run`, the same numbers the "
        "build logs as `estimate.*` in its MLflow run) said before it ran, against what the build then did. Each "
        "round is a new collection, so the cold refresh is estimated from that round's backfill alone (bulk "
        "embedding rate; a small refresh also pays the model load), and the warm one from the backfill and the "
        "cold refresh.",
        "",
        "| model | build | estimate s | actual s | texts estimated | texts embedded | bytes estimated "
        "| bytes written |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, *_, estimated in results:
        for build, m in estimated:
            est = f"{m['estimate.seconds']:.1f}" if "estimate.seconds" in m else "none yet"
            lines.append(
                f"| {label} | {build} | {est} | {m['seconds']:.1f} | {m['estimate.to_embed']:.0f} "
                f"| {m['embedded']:.0f} "
                f"| {m.get('estimate.bytes_added', 0) / 1e6:.1f} MB | {m['bytes_added'] / 1e6:.1f} MB |"
            )
    lines.append(MARK_END)
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(MARK_BEGIN, MARK_END, text)


if __name__ == "__main__":
    main()
