"""Soak: steady query load on a live endpoint while the source changes, refreshes are promoted and gc runs.

    .venv/bin/python bench/soak.py [--minutes 10] [--clients 8] [--rows 20000] [--refresh-every-s 60]
                                   [--keep 3] [--model hash|minilm] [--out DIR] [--write]

One local Ray in this process: --rows numbered stdlib docstrings in 8 Parquet files (bench/scale.py's Corpus) are
backfilled, then the embray Serve app (one replica of 0.5 CPU, serve.poll_s 1) answers on a free port while
--clients threads search it (closed loops of text queries, k 10, one requests.Session each) for --minutes. Every
--refresh-every-s, 1% of the rows change in one file (40% updated, 40% inserted, 20% deleted), then
`refresh(promote=True)` (a promotion a gate refuses is forced, and reported) and `gc(keep=--keep)`. Every second,
the RSS of the replica (the `ray::ServeReplica...` process under this one) and of this driver. Reported: failed
requests (non-200 or no answer; target 0), p50/p99 per minute, when each new version was first answered, RSS
against the active version's bytes, and a census of the store: each file under the collection belongs to a kept
version, the vector cache, a row state, a lease or a status file, or else it is left behind (target 0).
The plot goes to <--out>/soak.png (the work dir, default a new temp dir, is kept); --write puts it in
docs/img/soak.png and the tables into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import ROOT, machine, write_section  # noqa: E402 - the sibling benchmarks' helpers
from scale import Corpus, pct, proc_status, ray_workers, say  # noqa: E402

MARK_BEGIN = "<!-- bench/soak.py begin -->"
MARK_END = "<!-- bench/soak.py end -->"
FILES = 8
MB = 1024 * 1024
MODELS = {"hash": {"backend": "hash", "name": "words", "dims": 384}, "minilm": {"backend": "sentence-transformers"}}


def client(url: str, queries: list[str], c: int, every: int, t0: float, halt, records: list, errors: Counter) -> None:
    """A closed loop of text searches; each answer as (seconds since t0, status, ms, version named; -1: none)."""
    import requests

    session = requests.Session()
    while not halt.is_set():
        t, status, version = time.monotonic(), -1, None
        try:
            r = session.post(url, json={"text": queries[c % len(queries)], "k": 10}, timeout=60)
            status = r.status_code
            if status == 200:
                version = r.json()["version"]
            else:
                errors[f"{status} {r.text[:100]}"] += 1
        except requests.RequestException as e:
            errors[type(e).__name__] += 1
        records.append((t - t0, status, (time.monotonic() - t) * 1000, version))  # list.append is atomic
        c += every


def sample_rss(t0: float, halt, samples: list) -> None:
    """Every second: (seconds since t0, replica VmRSS kB, replica RssAnon kB, driver VmRSS kB, replica pid)."""
    pid = None
    while True:
        rep = proc_status(pid) if pid else {}
        if not rep:  # not found yet, or the replica was replaced
            titles = ray_workers(os.getpid()).items()
            pid = next((p for p, title in titles if title.startswith("ray::ServeReplica")), None)
            rep = proc_status(pid) if pid else {}
        me = proc_status(os.getpid())
        samples.append((time.monotonic() - t0, rep.get("VmRSS", 0), rep.get("RssAnon", 0), me.get("VmRSS", 0), pid))
        if halt.wait(1.0):
            return


def wait_ready(url: str, timeout: float = 180) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):  # not listening yet
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"{url} never became ready")


def cycle(col, corpus: Corpus, n: int, keep: int, t0: float) -> dict:
    """One change of the source, its refresh promoted (forced past a refusing gate) and a gc."""
    from embray.errors import GateError

    at = time.monotonic() - t0
    changed = corpus.mutate(0.01, seed=n, file=n % FILES)[:3]
    forced = ""
    try:
        version = col.refresh(promote=True).version
    except GateError as e:
        version = col.versions()[-1].id  # committed, not active
        col.promote(version, reason=f"bench/soak.py: {e}", force=True)
        forced = str(e)
    promoted = time.monotonic() - t0
    gone = col.gc(keep=keep)
    done = time.monotonic() - t0
    say(f"refresh {n}: {version} promoted after {promoted - at:.1f}s, gc deleted {len(gone.deleted)}")
    return dict(n=n, at=at, version=version, changed=changed, forced=forced, promoted=promoted, gc_s=done - promoted,
                deleted=len(gone.deleted), census=census(col))  # fmt: skip


def census(col) -> dict[str, list]:
    """Every file under the collection: category -> [files, bytes]; "left behind" lists its paths too."""
    from embray.lifecycle.versions import file_rel, list_versions
    from embray.storage.layout import manifest_rel

    kept = list_versions(col.store, col.name)
    owned = {file_rel(m, f) for m in kept for f in m.files()} | {manifest_rel(col.name, m.version) for m in kept}
    states = {p for m in kept for p in m.state_files()}
    fps = {m.fingerprint for m in kept}
    root = Path(col.store.path(col.name))
    out: dict[str, list] = {k: [0, 0] for k in ("kept versions", "vector cache", "row states", "leases", "status")}
    out["left behind"] = [0, 0, []]
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = f"{col.name}/{p.relative_to(root).as_posix()}"
        top = rel.split("/")[1]
        if p.name.startswith(".") or p.suffix in (".tmp", ".part", ".pending"):
            kind = "left behind"  # a write that never finished, wherever it is
        elif rel in owned:
            kind = "kept versions"
        elif top == "cache" and rel.split("/")[2] in fps:
            kind = "vector cache"
        elif rel in states:
            kind = "row states"
        else:
            kind = {"_locks": "leases", "_status": "status"}.get(top, "left behind")
        out[kind][0] += 1
        out[kind][1] += p.stat().st_size
        if kind == "left behind":
            out[kind][2].append(rel)
    return out


def version_bytes(col, version: str) -> tuple[int, int]:
    """(all files, the USearch shards) of a version, bytes."""
    m = col.manifest(version)
    return sum(f.bytes for f in m.files()), sum(s.index.bytes for s in m.shards if s.index)


def soak(args: argparse.Namespace, work: Path) -> dict:
    import ray
    from ray import serve

    from embray import Collection
    from embray.config import parse_config
    from embray.demo import collect
    from embray.serving import application
    from tests.helpers import free_port

    docs = list(collect(6000).values())
    corpus = Corpus(work / "corpus", docs, args.rows, FILES)
    corpus.write(range(FILES))
    port = free_port()
    cfg = parse_config(
        {
            "collection": "soak",
            "source": {"uri": str(corpus.root)},
            "store": {"uri": str(work / "store")},
            "mlflow": {"tracking_uri": f"sqlite:///{work}/mlflow.db"},
            "model": MODELS[args.model],
            "index": {"shards": 4},
            "embed": {"batch_size": 512, "actors": 1, "num_cpus": 1},
            "serve": {"port": port, "poll_s": 1, "num_cpus": 0.5, "replicas": 1},
        },
        base_dir=work,
    )
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        col = Collection(cfg)
        first = col.backfill().version
        bytes_first = version_bytes(col, first)  # before gc deletes it
        say(f"backfill: {first}; starting Serve on port {port}")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(cfg), name="embray", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        queries = [" ".join(d.split()[:12]) for d in random.Random(0).sample(docs, 300)]
        t0, halt, records, errors, rss = time.monotonic(), threading.Event(), [], Counter(), []
        search = f"{url}/v1/collections/soak/search"
        threads = [threading.Thread(target=sample_rss, args=(t0, halt, rss))] + [
            threading.Thread(target=client, args=(search, queries, c, args.clients, t0, halt, records, errors))
            for c in range(args.clients)
        ]
        for t in threads:
            t.start()
        end, cycles = args.minutes * 60, []
        while (due := (len(cycles) + 1) * args.refresh_every_s) < end:
            time.sleep(max(0.0, due - (time.monotonic() - t0)))
            cycles.append(cycle(col, corpus, len(cycles) + 1, args.keep, t0))
        time.sleep(max(0.0, end - (time.monotonic() - t0)))
        halt.set()
        for t in threads:
            t.join()
        return dict(records=records, errors=errors, rss=rss, cycles=cycles, end=end, census=census(col),
                    bytes_first=bytes_first, bytes_last=version_bytes(col, "active"),
                    kept=[v.id for v in col.versions()])  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()


def bins(records: list, width: float, end: float) -> list[tuple[float, int, float, int, float, float]]:
    """Per ``width`` s of load: (start s, requests, requests/s, failed, p50 ms, p99 ms of the 200s)."""
    out = []
    for b in range(int(-(-end // width))):
        lo, hi = b * width, min((b + 1) * width, end)
        got = [r for r in records if lo <= r[0] < hi]
        ok = [r[2] for r in got if r[1] == 200]
        p50, p99 = (pct(ok, 50), pct(ok, 99)) if ok else (float("nan"), float("nan"))
        out.append((lo, len(got), len(got) / (hi - lo), len(got) - len(ok), p50, p99))
    return out


def first_answered(records: list) -> dict[str, float]:
    seen: dict[str, float] = {}
    for t, _, _, v in sorted(records):
        if v is not None:
            seen.setdefault(v, t)
    return seen


def mb(b: float) -> str:
    return f"{b / MB:.1f}"


def memory_lines(res: dict) -> list[str]:
    """RSS start / max / end of the replica and the driver, against the bytes of the version it serves."""
    rss = res["rss"]
    rep = [s for s in rss if s[1]] or [(0.0, 0, 0, 0, None)]
    rows = [
        ("replica", [s[1] for s in rep]),
        ("replica, anonymous", [s[2] for s in rep]),
        ("driver", [s[3] for s in rss]),
    ]
    (first, first_idx), (last, last_idx) = res["bytes_first"], res["bytes_last"]
    return [
        "| RSS | start MB | max MB | end MB |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {mb(kb[0] * 1024)} | {mb(max(kb) * 1024)} | {mb(kb[-1] * 1024)} |" for name, kb in rows],
        "",
        f"Replica processes seen: {len({s[4] for s in rep if s[4]})}. The active version's files: {mb(first)} MB "
        f"at the start (USearch shards {mb(first_idx)} MB), {mb(last)} MB at the end ({mb(last_idx)} MB).",
    ]


def refresh_lines(res: dict) -> list[str]:
    seen = first_answered(res["records"])
    lines = [
        "| refresh | at s | version | updated / inserted / deleted | refresh + promote s | first answered "
        "(s after promote) | gc s | versions deleted | left behind after gc |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in res["cycles"]:
        lag = f"{seen[c['version']] - c['promoted']:+.1f}" if c["version"] in seen else "never"
        lines.append(
            f"| {c['n']} | {c['at']:.0f} | `{c['version']}`{' (forced)' if c['forced'] else ''} "
            f"| {' / '.join(map(str, c['changed']))} | {c['promoted'] - c['at']:.1f} | {lag} | {c['gc_s']:.1f} "
            f"| {c['deleted']} | {c['census']['left behind'][0]} |"
        )
    return lines


def report(args: argparse.Namespace, res: dict) -> str:
    import ray

    recs, cen = res["records"], res["census"]
    failed = sum(1 for r in recs if r[1] != 200)
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    forced = [c["forced"] for c in res["cycles"] if c["forced"]]
    lines = [
        MARK_BEGIN,
        "## Soak: query load through refreshes, promotions and gc",
        "",
        f"Command: `.venv/bin/python bench/soak.py {' '.join(sys.argv[1:])}` (commit {commit.stdout.strip() or '?'})",
        "",
        f"Machine: {machine()}, {mem_gb:.0f} GB RAM, Ray {ray.__version__}.",
        "",
        f"{args.rows:,} rows in {FILES} Parquet files, model `{args.model}`, 4 shards; one Serve replica (0.5 CPU, "
        f"poll_s 1) on the same machine; {args.clients} closed-loop clients (text queries, k 10) for "
        f"{args.minutes:g} min; every {args.refresh_every_s:g} s 1% of the rows change in one file, then "
        f"`refresh(promote=True)` and `gc(keep={args.keep})`.",
        "",
        f"**Failed requests: {failed} of {len(recs):,}** (target 0)"
        + ("".join(f"; {n} x `{e}`" for e, n in res["errors"].most_common(5)) if failed else "."),
        "",
        "| minute | requests | req/s | failed | p50 ms | p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| {lo / 60 + 1:.0f} | {n} | {r:.1f} | {f} | {a:.1f} | {b:.1f} |"
            for lo, n, r, f, a, b in bins(recs, 60, res["end"])
        ],
        "",
        *refresh_lines(res),
        *(["", f"Promotions forced past a gate: {len(forced)} (first: {forced[0]})."] if forced else []),
        "",
        *memory_lines(res),
        "",
        f"Store at the end (versions kept: {', '.join(res['kept'])}):",
        "",
        "| files under the collection | files | MB |",
        "| --- | ---: | ---: |",
        *[f"| {k} | {v[0]} | {mb(v[1])} |" for k, v in cen.items()],
        "",
        "Left behind: " + (", ".join(f"`{p}`" for p in cen["left behind"][2][:10]) or "nothing") + ".",
        "",
        "![soak](img/soak.png)",
        MARK_END,
    ]
    return "\n".join(lines)


def plot(args: argparse.Namespace, res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = bins(res["records"], 10, res["end"])
    x = [(lo + 5) / 60 for lo, *_ in b]
    fig, (lat, mem, rate) = plt.subplots(3, 1, sharex=True, figsize=(10, 8), dpi=110)
    lat.plot(x, [r[4] for r in b], label="p50")
    lat.plot(x, [r[5] for r in b], label="p99")
    lat.set_ylabel("latency ms (per 10 s)")
    rss = res["rss"]
    mem.plot([s[0] / 60 for s in rss], [s[1] / 1024 for s in rss], label="replica RSS")
    mem.plot([s[0] / 60 for s in rss], [s[2] / 1024 for s in rss], label="replica anonymous", linestyle="--")
    mem.axhline(res["bytes_last"][0] / MB, color="gray", linestyle=":", label="active version's files (end)")
    mem.set_ylabel("MB")
    rate.plot(x, [r[2] for r in b], label="requests/s")
    rate.bar(x, [r[3] for r in b], width=8 / 60, color="red", label="failed (count)")
    rate.set_ylabel("per 10 s")
    rate.set_xlabel("minutes of load")
    seen = first_answered(res["records"])
    lat.axvspan(0, 0, color="orange", alpha=0.2, label="refresh + promote")
    lat.axvline(-1, color="green", alpha=0.6, label="new version first answered")
    for ax in (lat, mem, rate):
        for c in res["cycles"]:
            ax.axvspan(c["at"] / 60, c["promoted"] / 60, color="orange", alpha=0.2)
            if c["version"] in seen:
                ax.axvline(seen[c["version"]] / 60, color="green", alpha=0.6)
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    lat.set_xlim(0, res["end"] / 60)
    lat.set_title(f"embray soak: {args.clients} clients, {args.rows:,} rows, refresh every {args.refresh_every_s:g} s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    say(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--refresh-every-s", type=float, default=60)
    ap.add_argument("--keep", type=int, default=3, help="gc --keep")
    ap.add_argument("--model", choices=sorted(MODELS), default="hash", help="minilm: sentence-transformers")
    ap.add_argument("--out", help="work dir (corpus, store, MLflow, the plot); default a new temp dir")
    ap.add_argument("--write", action="store_true", help="docs/img/soak.png and the section in docs/benchmarks.md")
    args = ap.parse_args()
    work = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="embray-soak-"))
    if work.exists() and any(work.iterdir()):
        ap.error(f"--out {work} is not empty: name a new or empty directory")
    work.mkdir(parents=True, exist_ok=True)
    say(f"work dir {work}")
    res = soak(args, work)
    text = report(args, res)
    print(text)
    plot(args, res, ROOT / "docs" / "img" / "soak.png" if args.write else work / "soak.png")
    if args.write:
        write_section(MARK_BEGIN, MARK_END, text)


if __name__ == "__main__":
    main()
