"""Warm models across jobs: 1%-change MiniLM refreshes as separate `embray refresh` commands (each its own Ray
job) on one long-lived Ray (`ray start --head`), with embed.keep_warm_s 0 (a plain task loads the model in
every job) and then 300 (the first refresh makes the warm actor, the next ones reuse it).

    .venv/bin/python bench/warm_refresh.py [--docs 3000] [--refreshes 3] [--write]

The backfill uses the actor pool (--docs above 4 x embed.batch_size), so no worker holds the model before
the first refresh. Reports per refresh the command's wall time (process start, Ray connect, MLflow, the
build) and the build's embed stage; --write puts the table into docs/benchmarks.md. The `ray start` head
runs in its own session and is stopped at the end (only the processes this script started).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# The head and every command run here, on loopback: no token (Ray 2.59+ wants one for `ray start` clusters).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import ROOT, machine, write_section  # noqa: E402 - the sibling benchmark's helpers
from refresh import mutate, write_corpus  # noqa: E402

MARK_BEGIN = "<!-- bench/warm_refresh.py begin -->"
MARK_END = "<!-- bench/warm_refresh.py end -->"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--node-ip-address=127.0.0.1",
         "--disable-usage-stats", f"--temp-dir={tmp / 'ray'}"],
        start_new_session=True, stdout=open(tmp / "ray-head.log", "wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ok = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address={address!r}); print(ray.cluster_resources())"],
            capture_output=True, text=True,
        )  # fmt: skip
        if ok.returncode == 0:
            return head, address
        time.sleep(2)
    _stop(head)
    raise SystemExit(f"ray start did not come up: {ok.stderr[-2000:]}")


def _stop(head: subprocess.Popen) -> None:
    os.killpg(head.pid, signal.SIGTERM)  # the head this script started, and its session
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def _config(tmp: Path, address: str, keep: float) -> Path:
    path = tmp / f"embray-{keep:g}.yaml"
    path.write_text(
        "collection: docs\n"
        "source: {uri: ./corpus}\n"
        "store: {uri: ./store}\n"
        "model: {backend: sentence-transformers, name: all-MiniLM-L6-v2}\n"
        "index: {shards: 4}\n"
        f"embed: {{batch_size: 512, actors: 1, num_cpus: 1, keep_warm_s: {keep:g}}}\n"
        f"ray: {{address: '{address}'}}\n"
    )
    return path


def _cli(*args: str, cwd: Path) -> tuple[float, dict]:
    t = time.perf_counter()
    out = subprocess.run([str(BIN / "embray"), *args, "--json"], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"embray {' '.join(args)} failed: {out.stderr[-3000:]}")
    return wall, json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--refreshes", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from embray.demo import write_demo

    tmp = Path(tempfile.mkdtemp(prefix="embray-bench-warm-"))
    write_demo(tmp / "demo", docs=args.docs, files=8)
    docs = pq.read_table(tmp / "demo" / "corpus").to_pydict()
    rows = {i: f"{t} [{i}]" for i, t in zip(docs["id"], docs["text"], strict=True)}
    write_corpus(tmp / "corpus", rows, files=8)
    head, address = _start_head(tmp)
    results: dict[float, list[tuple[float, float, int]]] = {}
    try:
        wall, built = _cli("backfill", "--config", str(_config(tmp, address, 0)), cwd=tmp)
        print(f"backfill {wall:.1f}s: {built['rows']} rows, {built['embedded']} embedded", file=sys.stderr)
        step = 0
        for keep in (0.0, 300.0):
            results[keep] = []
            for _ in range(args.refreshes):
                step += 1
                rows, _, _ = mutate(rows, 0.01, seed=step)
                write_corpus(tmp / "corpus", rows, files=8)
                wall, res = _cli("refresh", "--config", str(_config(tmp, address, keep)), cwd=tmp)
                stats = json.loads((tmp / "store" / "docs" / "versions" / res["version"] / "manifest.json").read_text())
                embed_s = stats["stats"]["embed_seconds"]
                results[keep].append((wall, embed_s, res["embedded"]))
                print(f"keep_warm_s {keep:g}: refresh {wall:.1f}s (embed {embed_s:.2f}s, {res['embedded']} texts)",
                      file=sys.stderr, flush=True)  # fmt: skip
    finally:
        _stop(head)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    med = statistics.median
    lines = [
        MARK_BEGIN,
        "## Warm models across jobs (embed.keep_warm_s)",
        "",
        f"Command: `.venv/bin/python bench/warm_refresh.py --docs {args.docs} --refreshes {args.refreshes}` "
        f"(commit {commit.stdout.strip() or '?'})",
        "",
        f"Machine: {machine()}.",
        "",
        f"One long-lived Ray (`ray start --head --num-cpus=2`); MiniLM collection of {args.docs} docstrings, "
        "backfilled once through the actor pool; then, one after the other, each on a further 1% change "
        f"({results[0.0][0][2]} texts to embed), `embray refresh --config ... --json` as its own process and Ray "
        "job: first with `embed.keep_warm_s: 0` (a plain Ray task, in the job's fresh worker, imports torch and "
        "loads the model every time), then with `keep_warm_s: 300` (the first refresh makes the warm actor, the "
        "next ones reuse it). *wall* is the whole command (interpreter start, imports, Ray connect, MLflow, the "
        "build); *embed* is the build's embed stage.",
        "",
        "| keep_warm_s | refresh | wall s | embed s |",
        "| ---: | --- | ---: | ---: |",
    ]
    for keep, runs in results.items():
        for n, (wall, embed_s, _) in enumerate(runs, 1):
            what = "plain task" if keep == 0 else ("cold: makes the warm actor" if n == 1 else "warm")
            lines.append(f"| {keep:g} | {n} ({what}) | {wall:.1f} | {embed_s:.2f} |")
    cold = [e for _, e, _ in results[0.0]]
    warm = [e for _, e, _ in results[300.0][1:]]
    lines += [
        "",
        f"Median embed stage: {med(cold):.2f} s with a plain task, {med(warm):.2f} s warm "
        f"({med(cold) / max(med(warm), 1e-9):.0f}x); median command: {med(w for w, _, _ in results[0.0]):.1f} s vs "
        f"{med(w for w, _, _ in results[300.0][1:]):.1f} s.",
        MARK_END,
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(MARK_BEGIN, MARK_END, text)


if __name__ == "__main__":
    main()
