"""Two checkouts of embray side by side on the same 1% refreshes: build seconds per stage, medians and ratios.

    .venv/bin/python bench/refresh_ab.py --a /tmp/embray-old --b . [--from /tmp/embray-bench-groups/hash-1000000]
                                         [--rounds 2] [--refreshes 3] [--write]

--a and --b are checkouts (e.g. `git worktree add /tmp/embray-old <commit>`). Each round runs both, in turns
(a then b, then b then a), each as a child process with its checkout first on the import path: a fresh copy of
the collection (--from, as bench/serve_groups.py builds it; `hash` backend, no model load), its own local Ray,
a warm-up (bench/segments.py's: workers started, no warm actor left holding a CPU), then --refreshes chained
refreshes, each of a 1% random change (the same changes on both sides: one seed per round). It reports the
manifests' build seconds: total, scan + plan, embed, shard stage. Medians over every refresh of every round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import machine, write_section  # noqa: E402 - the sibling benchmark's helpers

MARKS = ("<!-- bench/refresh_ab.py begin -->", "<!-- bench/refresh_ab.py end -->")
STAGES = (
    ("seconds", "build"),
    ("plan_seconds", "scan + plan"),
    ("embed_seconds", "embed"),
    ("shard_seconds", "shards"),
)

CHILD = """
import json, os, random, sys
from pathlib import Path
import embray  # first: this checkout's, before the bench helpers put the main checkout on the path
from embray import Collection
assert embray.__file__.startswith({tree!r}), embray.__file__
sys.path.insert(1, {bench!r})
import ray
from segments import config, mutate, read_corpus, warm_up
work = Path({work!r})
ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
warm_up(work, work.parent / (work.name + "-warm"), "hash")
col, files, rng = Collection(config(work, "hash")), read_corpus(work / "corpus"), random.Random({seed})
parent, out = None, []
for r in range({refreshes}):
    mutate(files, 0.01, rng, "ab{seed}-" + str(r))
    res = col.refresh(parent)
    parent = res.version
    out.append(res.manifest.stats)
print("RESULT " + json.dumps(out))
"""


def run_side(tree: Path, src: Path, work: Path, seed: int, refreshes: int) -> list[dict]:
    shutil.rmtree(work, ignore_errors=True)
    for d in ("corpus", "store"):
        shutil.copytree(src / d, work / d)
    os.sync()  # the copy's writeback would otherwise compete with the refreshes for the disk
    bench = str(Path(__file__).resolve().parent)
    code = CHILD.format(bench=bench, tree=str(tree), work=str(work), seed=seed, refreshes=refreshes)
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{tree}: the child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    shutil.rmtree(work)
    return json.loads(lines[-1][len("RESULT ") :])


def rev(tree: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=tree)
    return out.stdout.strip() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, type=Path)
    ap.add_argument("--b", required=True, type=Path)
    ap.add_argument("--from", dest="src", default="/tmp/embray-bench-groups/hash-1000000", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--refreshes", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/embray-bench-ab", type=Path)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    trees = {"a": args.a.resolve(), "b": args.b.resolve()}
    got: dict[str, list[dict]] = {"a": [], "b": []}
    for r in range(args.rounds):
        for side in ("a", "b") if r % 2 == 0 else ("b", "a"):
            stats = run_side(trees[side], args.src, args.workdir / side, 100 + r, args.refreshes)
            got[side] += stats
            print(f"round {r} {side}: {[round(s['seconds'], 2) for s in stats]}", file=sys.stderr, flush=True)
    backfill = json.loads(next((args.src / "store").glob("*/versions/*/manifest.json")).read_text())["stats"]
    med = {side: {k: statistics.median(s[k] for s in got[side]) for k, _ in STAGES} for side in got}
    lines = [
        MARKS[0],
        "## Refresh stages, two checkouts side by side",
        "",
        f"Command: `.venv/bin/python bench/refresh_ab.py --a <checkout of {rev(trees['a'])}> --b <checkout of "
        f"{rev(trees['b'])}> --rounds {args.rounds} --refreshes {args.refreshes}`",
        "",
        f"Machine: {machine()}.",
        "",
        f"Collection: `{args.src}` (1,000,000 rows, `hash` backend, 8 shards; its backfill's build took "
        f"{backfill['seconds']:.0f} s). Each refresh: a 1% random change (0.4% inserted, 0.4% updated, 0.2% "
        "deleted, every source file rewritten), chained, the same changes on both sides; delta segments (the "
        f"default). Medians of {len(got['a'])} refreshes a side (build seconds, from the manifests):",
        "",
        f"| stage | a ({rev(trees['a'])}) s | b ({rev(trees['b'])}) s | b / a |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k, label in STAGES:
        lines.append(f"| {label} | {med['a'][k]:.2f} | {med['b'][k]:.2f} | {med['b'][k] / med['a'][k]:.2f} |")
    lines += [
        f"| build / backfill build | {med['a']['seconds'] / backfill['seconds']:.4f} "
        f"| {med['b']['seconds'] / backfill['seconds']:.4f} | |",
        MARKS[1],
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(*MARKS, text)


if __name__ == "__main__":
    main()
