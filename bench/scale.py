"""Scale: a million-row collection through its whole life on one machine (issue 10, part 5).

    .venv/bin/python bench/scale.py [--rows 1000000] [--files 100] [--shards 8] [--queries 300]
                                    [--workdir DIR] [--keep] [--write]

One local Ray, started once; the `hash` model backend (no ML model: this is about the pipeline, the store and
the index, not the encoder). The corpus is --rows unique short texts (stdlib docstrings, each numbered, as in
bench/refresh.py) with string ids, in --files Parquet files. In this order:
  backfill          the whole corpus into a fresh store: wall time, rows/s, stage times, store bytes per row
  status            `Collection.status(verify=False)` on the unchanged corpus (the staleness check: a dry-run
                    refresh of the active version against the source)
  status --verify   `Collection.status()` once, which also verifies the active version (reads every file)
  one-file change   1% of the rows (0.4% updated, 0.4% inserted, 0.2% deleted) all in ONE of the files, which is
                    rewritten; the other files are left untouched
  status            on that corpus, before any refresh
  refresh           the child version that absorbs it; then `promote` (timed apart: the gates, verify and
                    ANN recall@10, run on it; forced with a reason when the hash model's recall misses the floor)
  random change     another 1% (same mix) spread at random over all the files; every file touched is rewritten
  refresh           and promote, as above
  serve             a fresh process, standing in for a Serve replica, opens the active version as a replica does
                    (`Collection.index` + one warm-up text query): its load time and its RSS against the
                    version's index bytes; then --queries vector queries and --queries text queries,
                    one client, k = 10: p50 / p99
While Ray runs, a thread samples every 0.2 s the RSS of this driver and of every Ray worker process it started
(the processes titled `ray::...`, found under this process in /proc; each step resets their peak counters first,
so VmHWM is the step's own peak, with the task title the worker had when it rose). Ratios are to the backfill's
wall time (targets: status <= 0.02; the replica's RSS < 1.5x the index bytes). One run; --write puts the table
into docs/benchmarks.md. Keep small runs small: `--rows 20000 --files 20` takes a few minutes on 2 CPUs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import ROOT, machine, write_section  # noqa: E402 - the sibling benchmark's helpers

MARK_BEGIN = "<!-- bench/scale.py begin -->"
MARK_END = "<!-- bench/scale.py end -->"
WARMUP_QUERY = "embray warm-up query"  # what a Serve replica asks a version it has just loaded
MB = 1024 * 1024


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# --- the corpus: a function of the row number, plus the edits made to it ----------------------------------


class Corpus:
    """--rows numbered texts in --files Parquet files (row k in file k % files), edited in place.

    The base corpus is never held in memory (a million rows would weigh on the driver's RSS being measured):
    a file is regenerated from the row numbers, the edits and the rows inserted into it, and only the files an
    edit touched are rewritten.
    """

    def __init__(self, root: Path, docs: list[str], rows: int, files: int):
        self.root, self.docs, self.rows, self.files = root, docs, rows, files
        self.edits: dict[int, str | None] = {}  # row -> its new text; None: deleted
        self.inserted: dict[int, list[tuple[str, str]]] = {}  # file -> (id, text) rows added to it

    def text(self, k: int) -> str:
        return self.edits.get(k, f"{self.docs[k % len(self.docs)]} [{k}]")  # type: ignore[return-value]

    def path(self, f: int) -> Path:
        return self.root / f"p{f:04d}.parquet"

    def write(self, files) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.root.mkdir(parents=True, exist_ok=True)
        for f in sorted(files):
            live = [k for k in range(f, self.rows, self.files) if self.edits.get(k, "") is not None]
            extra = self.inserted.get(f, [])
            ids = [f"r{k:08d}" for k in live] + [i for i, _ in extra]
            texts = [self.text(k) for k in live] + [t for _, t in extra]
            tmp = self.path(f).with_suffix(".tmp")
            pq.write_table(pa.table({"id": ids, "text": texts}), tmp)
            tmp.rename(self.path(f))  # a reader sees the old file or the new one, never half of one

    def mutate(self, fraction: float, seed: int, file: int | None = None) -> tuple[int, int, int, int]:
        """Update, insert and delete ``fraction`` of --rows (40/40/20), in ``file`` or spread over all files; the
        touched files are rewritten. Returns (updated, inserted, deleted, files rewritten)."""
        rng = random.Random(seed)
        n = round(self.rows * fraction)
        n_ins, n_upd = round(n * 0.4), round(n * 0.4)
        n_del = n - n_ins - n_upd
        pool = range(file, self.rows, self.files) if file is not None else range(self.rows)
        live = [k for k in pool if self.edits.get(k, "") is not None]
        if len(live) < n_upd + n_del:
            raise SystemExit(
                f"file {file} has {len(live)} rows left, too few to update {n_upd} and delete {n_del} of them; "
                "use fewer --files or more --rows"
            )
        picked = rng.sample(live, n_upd + n_del)
        touched = set()
        for k in picked[:n_upd]:
            self.edits[k] = f"{self.text(k)} (revised {seed})"
            touched.add(k % self.files)
        for k in picked[n_upd:]:
            self.edits[k] = None
            touched.add(k % self.files)
        for j in range(n_ins):
            f = file if file is not None else rng.randrange(self.files)
            self.inserted.setdefault(f, []).append(
                (f"ins-{seed}-{j}", f"{self.docs[j % len(self.docs)]} (new {seed}-{j})")
            )
            touched.add(f)
        self.write(touched)
        return n_upd, n_ins, n_del, len(touched)


# --- memory: this driver and the Ray worker processes under it ----------------------------------------------


def proc_status(pid: int | str) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in kB ({} when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        return {}
    return out


def reset_peak(pid: int | str) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux: 5 > /proc/PID/clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def ray_workers(root: int) -> dict[int, str]:
    """pid -> process title of the `ray::...` processes descending from ``root`` (the raylet's workers)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    title = fh.read().split(b"\0", 1)[0].decode(errors="replace").strip()
            except OSError:
                continue
            if title.startswith("ray::"):
                out[pid] = title
    return out


@dataclass
class Peak:
    """One step's peaks, kB."""

    driver_kb: int = 0
    worker_kb: int = 0
    worker_title: str = ""
    workers_sum_kb: int = 0  # the most RSS all Ray workers held at one sample (shared pages counted in each)
    workers_seen: int = 0
    samples: int = 0
    hwm: bool = True  # the driver's peak from VmHWM (reset at the step's start); False: from the samples alone
    titles: dict[int, str] = field(default_factory=dict)
    at_start: set[int] = field(default_factory=set)  # workers alive when the step began ...
    reset: set[int] = field(default_factory=set)  # ... and those whose VmHWM was reset then


class Sampler(threading.Thread):
    """Samples the driver's and the Ray workers' RSS every ``interval`` s; ``step(name)`` starts a new step."""

    def __init__(self, interval: float = 0.2):
        super().__init__(name="rss-sampler", daemon=True)
        self.interval, self.me = interval, os.getpid()
        self.peaks: dict[str, Peak] = {}
        self.current: Peak | None = None
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.start()

    def step(self, name: str) -> Peak:
        with self.lock:
            peak = Peak()
            peak.hwm = reset_peak(self.me)
            peak.at_start = set(ray_workers(self.me))
            peak.reset = {pid for pid in peak.at_start if reset_peak(pid)}
            self.peaks[name] = self.current = peak
        self._sample()
        return peak

    def done(self) -> None:
        self._sample()
        with self.lock:
            self.current = None

    def stop(self) -> None:
        self.halt.set()
        self.join()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        with self.lock:
            p = self.current
            if p is None:
                return
            me = proc_status(self.me)
            p.driver_kb = max(p.driver_kb, me.get("VmHWM" if p.hwm else "VmRSS", 0), me.get("VmRSS", 0))
            total = 0
            for pid, title in ray_workers(self.me).items():
                st = proc_status(pid)
                if not st:
                    continue
                total += st["VmRSS"]
                # VmHWM is this step's own peak for a worker reset at its start or started during it
                own = pid in p.reset or pid not in p.at_start
                rss = max(st["VmRSS"], st["VmHWM"] if own else 0)
                previous = p.titles.get(pid, title)
                p.titles[pid] = title
                if rss > p.worker_kb:
                    # the peak was reached since the last sample: the task then running, or the one now
                    seen = [t for t in dict.fromkeys((previous, title)) if t != "ray::IDLE"] or [title]
                    p.worker_kb, p.worker_title = rss, " / ".join(seen)
            p.workers_sum_kb = max(p.workers_sum_kb, total)
            p.workers_seen = max(p.workers_seen, len(p.titles))
            p.samples += 1


def tree_bytes(root: Path) -> dict[str, int]:
    """Bytes under a store, by directory of each collection (versions, cache, sources...); hard links once."""
    out: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()
    for dirpath, _, names in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        part = rel[1] if len(rel) > 1 else "other"
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            out[part] = out.get(part, 0) + st.st_size
    return out


def stages(stats: dict[str, float]) -> str:
    """A manifest's stage times (scan and plan are timed together)."""
    return (
        f"build {stats['seconds']:.1f}s: scan+plan {stats['plan_seconds']:.1f}, embed {stats['embed_seconds']:.1f}, "
        f"shards {stats['shard_seconds']:.1f}"
    )


@dataclass
class Step:
    name: str
    seconds: float
    rows: int | None = None  # rows processed (backfill: rows/s)
    note: str = ""
    peak: Peak | None = None
    ratio: bool = True  # show seconds / backfill seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--queries", type=int, default=300, help="vector queries and text queries, each")
    ap.add_argument("--workdir", help="where the corpus, store and MLflow database go (kept); default: a temp dir")
    ap.add_argument("--keep", action="store_true", help="keep the default temp dir")
    ap.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = ap.parse_args()
    if args.files < 2 or args.rows < 100 * args.files:
        ap.error("need --files >= 2 and at least 100 rows per file (--rows >= 100 * --files)")
    if args.workdir:
        work = Path(args.workdir).resolve()
        if work.exists() and any(work.iterdir()):
            ap.error(f"--workdir {work} is not empty: name a new or empty directory")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="embray-bench-scale-"))
    try:
        run(args, work)
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    import numpy as np
    import pyarrow.parquet as pq
    import ray

    from embray import Collection
    from embray.config import parse_config
    from embray.demo import collect
    from embray.errors import GateError
    from embray.lifecycle.versions import file_rel
    from embray.storage.vectors import to_numpy

    say(f"workdir {work}")
    docs = list(collect(6000).values())
    corpus = Corpus(work / "corpus", docs, args.rows, args.files)
    mean_chars = statistics.mean(len(corpus.text(k)) for k in range(0, args.rows, max(1, args.rows // 5000)))
    t = time.perf_counter()
    corpus.write(range(args.files))
    say(f"corpus: {args.rows} rows in {args.files} files, written in {time.perf_counter() - t:.1f}s")

    def cfg_data(name: str, source: Path, store: Path) -> dict:
        return {
            "collection": name,
            "source": {"uri": str(source)},
            "store": {"uri": str(store)},
            "mlflow": {"tracking_uri": f"sqlite:///{work}/mlflow.db"},
            "model": {"backend": "hash", "name": "words", "dims": 384},
            "index": {"shards": args.shards},
            # the warm-up leaves no warm actor holding a CPU (a CLI backfill starts on a fresh Ray)
            "embed": {"batch_size": 512, "actors": 1, "num_cpus": 1, "keep_warm_s": 0 if name == "warmup" else 300},
            "serve": {"poll_s": 3600},
        }

    def cfg(name: str, source: Path, store: Path):
        return parse_config(cfg_data(name, source, store), base_dir=work)

    warm = Corpus(work / "warmup-corpus", docs, 400, 2)
    warm.write(range(2))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    sampler = Sampler()
    steps: list[Step] = []
    try:
        # Ray's workers and the MLflow database, made before anything is timed
        Collection(cfg("warmup", warm.root, work / "warmup-store")).backfill()
        col = Collection(cfg("scale", corpus.root, work / "store"))

        def timed(name: str, fn, **kw):
            peak = sampler.step(name)
            t0 = time.perf_counter()
            out = fn()
            s = time.perf_counter() - t0
            sampler.done()
            steps.append(Step(name, s, peak=peak, **kw))
            say(f"{name}: {s:.1f}s")
            return out

        built = timed("backfill", col.backfill, rows=args.rows)
        if built.rows != args.rows or built.counts.embedded != args.rows:
            raise SystemExit(
                f"backfill built {built.rows} rows, embedded {built.counts.embedded}; expected {args.rows}"
            )
        m0 = built.manifest
        store_bytes = tree_bytes(work / "store")
        version_bytes = sum(f.bytes for f in m0.files())
        index_bytes0 = sum(s.index.bytes for s in m0.shards if s.index)
        first = next(s for s in m0.shards if s.embeddings)
        part = next(
            pq.ParquetFile(work / "store" / file_rel(m0, first.embeddings)).iter_batches(2000, columns=["vector"])
        )
        nonzero = float((to_numpy(part.column("vector"), m0.dims) != 0).sum(axis=1).mean())  # of its first 2000 rows
        steps[-1].note = stages(m0.stats)

        def staleness_of(report, want: tuple[int, int, int]) -> str:
            st = report.staleness
            got = (st.new, st.changed, st.deleted) if st else None
            if got != want:
                raise SystemExit(f"status saw (new, changed, deleted) {got}; expected {want}")
            return f"stale {st.stale} rows ({st.fraction:.4f}), report.seconds {report.seconds:.1f}"

        st = timed("status, corpus unchanged", lambda: col.status(verify=False))
        steps[-1].note = staleness_of(st, (0, 0, 0))
        st = timed("status with verify, corpus unchanged", lambda: col.status(verify=True))
        if st.consistent is not True:
            raise SystemExit(f"verify found problems: {st.problems}")
        steps[-1].note = staleness_of(st, (0, 0, 0)) + "; verified the active version"

        one = args.files // 2
        upd, ins, dele, _ = corpus.mutate(0.01, seed=1, file=one)
        say(f"one-file change: file {one}, {upd} updated, {ins} inserted, {dele} deleted")
        st = timed(f"status, 1 of {args.files} files changed", lambda: col.status(verify=False))
        steps[-1].note = staleness_of(st, (ins, upd, dele))

        def refresh_and_promote(label: str, want: tuple[int, int, int]) -> str:
            res = timed(f"refresh, {label}", col.refresh)
            c = res.counts
            if (c.new, c.changed, c.deleted, c.embedded) != (*want, want[0] + want[1]):
                raise SystemExit(f"refresh {label}: {res.to_dict()}; expected (new, changed, deleted) {want}")
            steps[-1].note = f"embedded {c.embedded}; " + stages(res.manifest.stats)

            def promote():
                try:
                    return col.promote(res.version, reason="bench/scale.py")
                except GateError as e:
                    say(f"promote refused ({e}); forcing it")
                    return col.promote(res.version, reason=f"bench/scale.py, hash model: {e}", force=True)

            pr = timed(f"promote the refresh of {label} (gates)", promote)
            steps[-1].note = "; ".join(
                f"{g.gate} {'passed' if g.passed else 'failed'}" + (f" {g.value:.4f}" if g.value is not None else "")
                for g in pr.gates
            ) + ("; forced" if pr.forced else "")
            steps[-1].ratio = False
            return res.version

        refresh_and_promote(f"1 of {args.files} files changed", (ins, upd, dele))
        upd2, ins2, del2, touched = corpus.mutate(0.01, seed=2)
        say(f"random change: {upd2} updated, {ins2} inserted, {del2} deleted, {touched} files rewritten")
        final = refresh_and_promote(f"1% random over {touched} files", (ins2, upd2, del2))
        peaks_ok = all(s.peak.hwm and s.peak.reset == s.peak.at_start for s in steps if s.peak)
    finally:
        sampler.stop()
        ray.shutdown()

    # --- serve: a fresh process opens the active version the way a Serve replica does ----------------------
    if col.resolve("active") != final:
        raise SystemExit(f"active is {col.resolve('active')}, expected {final}")
    rng = np.random.default_rng(0)
    texts = [
        " ".join(docs[i].split()[:12]) for i in rng.choice(len(docs), args.queries, replace=args.queries > len(docs))
    ]
    spec = work / "probe.json"
    spec.write_text(
        json.dumps(
            {
                "config": cfg_data("scale", corpus.root, work / "store"),
                "work": str(work),
                "version": final,
                "texts": texts,
            }
        )
    )
    out = subprocess.run([sys.executable, __file__, "--probe", str(spec)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"the replica probe failed: {out.stderr[-2000:]}")
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    lat, load_s, index_bytes, served_rows = rep["lat"], rep["load_s"], rep["index_bytes"], rep["rows"]

    # --- the table --------------------------------------------------------------------------------------
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "embray"], capture_output=True, cwd=ROOT)
    back = steps[0].seconds

    def mb(kb: int) -> str:
        return f"{kb / 1024:.0f}"

    lines = [
        MARK_BEGIN,
        "## Scale: a million rows on one machine",
        "",
        f"Command: `.venv/bin/python bench/scale.py --rows {args.rows} --files {args.files} --shards {args.shards} "
        f"--queries {args.queries}` (commit {commit.stdout.strip() or '?'}"
        + (", with uncommitted changes in embray/" if commit.returncode == 0 and dirty.returncode == 1 else "")
        + ")",
        "",
        f"Machine: {machine()}.",
        "",
        f"Corpus: {args.rows} unique texts (stdlib docstrings, numbered; mean "
        f"{mean_chars:.0f} "
        f"characters) with string ids in {args.files} Parquet files; model: the `hash` backend (384 dims, no ML "
        f"model); index: {args.shards} USearch shards, f16, cos, connectivity 16, expansion_add 128; embed: 1 actor "
        "of 1 CPU, batch 512. One local Ray, started once (a 400-row warm-up backfill of another collection before "
        "the timings), MLflow on sqlite. One run, wall-clock seconds of the `Collection` call; ratios are to the "
        "backfill. Peak RSS: this driver, and the largest Ray worker process (`ray::` title: the task it ran when "
        "its peak rose), sampled every 0.2 s"
        + (", each step's own VmHWM (reset at its start)." if peaks_ok else " (VmHWM could not be reset: samples).")
        + " *1 of N files changed*: 1% of the rows (0.4% updated, 0.4% inserted, 0.2% deleted) all in one file, "
        "rewritten, the others untouched; *1% random*: the same mix at random over the files, every touched file "
        "rewritten. Each refresh is promoted before the next step (timed apart: the gates verify and ANN "
        "recall@10 run first).",
        "",
        "| step | seconds | vs backfill | rows/s | driver peak RSS MB | largest Ray worker peak RSS MB "
        "| all Ray workers at once MB (processes) | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in steps:
        p = s.peak
        worker = f"{mb(p.worker_kb)} (`{p.worker_title[:60]}`)" if p and p.worker_kb else ""
        ratio = f"{s.seconds / back:.4f}" if s.ratio and s is not steps[0] else ("1" if s is steps[0] else "")
        rate = f"{s.rows / s.seconds:.0f}" if s.rows and s is steps[0] else ""
        lines.append(
            f"| {s.name} | {s.seconds:.1f} | {ratio} | {rate} | {mb(p.driver_kb) if p else ''} | {worker} "
            f"| {f'{mb(p.workers_sum_kb)} ({p.workers_seen})' if p else ''} | {s.note} |"
        )
    status_ratios = [s.seconds / back for s in steps if s.name.startswith("status,")]
    lines += [
        "",
        f"Status (staleness check, verify=False) / backfill: {', '.join(f'{r:.4f}' for r in status_ratios)} "
        f"(target <= 0.02: {'met' if max(status_ratios) <= 0.02 else 'not met'}).",
        "",
        f"Store after the backfill: the version's files {version_bytes / 1e6:.1f} MB = "
        f"{version_bytes / args.rows:.0f} bytes per row (USearch shards {index_bytes0 / args.rows:.0f}, embeddings "
        f"parts and rejects {(version_bytes - index_bytes0) / args.rows:.0f}); everything under the store "
        f"{sum(store_bytes.values()) / 1e6:.1f} MB = {sum(store_bytes.values()) / args.rows:.0f} bytes per row ("
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(store_bytes.items()))
        + "; cache: every embedded vector again, by content hash; sources: each source file's row states). "
        "The `hash` model's vectors are "
        f"sparse ({nonzero:.0f} non-zeros of {m0.dims} on average), which Parquet's dictionary and run-length "
        "encoding shrink: the embeddings parts and the cache of a real model's dense float32 vectors take about "
        f"{m0.dims * 4} bytes per row or more; the USearch shards (f16) are the size they would be.",
        "",
        "Serve: a fresh Python process stands in for a Serve replica: it imports embray, opens the final active "
        "version as a replica does (`Collection.index` + one warm-up text query; the version's files were just "
        "written and verified, so they are in the OS page cache: a load from cold disk or S3 takes longer), then "
        "runs the queries one at a time, k = 10, after 20 warm-up queries each. Vector queries are the text "
        "queries embedded beforehand; text queries are the first 12 words of random docstrings. RSS is the "
        "process's own (VmRSS): after the imports, after the load, after the queries (anonymous / file-backed: "
        "the memory-mapped shards).",
        "",
        "| rows | index bytes MB | load s | RSS after imports MB | RSS after load MB | RSS after the queries MB "
        "(anon / file-backed) | RSS / index bytes | target < 1.5x |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| {served_rows} | {index_bytes / 1e6:.1f} | {load_s:.2f} | {rep['base']['VmRSS'] / 1024:.0f} "
        f"| {rep['loaded']['VmRSS'] / 1024:.0f} "
        f"| {rep['after']['VmRSS'] / 1024:.0f} ({rep['after']['RssAnon'] / 1024:.0f} / "
        f"{rep['after']['RssFile'] / 1024:.0f}) | {rep['after']['VmRSS'] * 1024 / index_bytes:.2f}x "
        f"| {'met' if rep['after']['VmRSS'] * 1024 < 1.5 * index_bytes else 'not met'} |",
        "",
        "| query | queries | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for kind, xs in lat.items():
        lines.append(f"| {kind} | {len(xs)} | {statistics.median(xs):.2f} | {pct(xs, 99):.2f} |")
    lines.append(MARK_END)
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(MARK_BEGIN, MARK_END, text)


def probe(spec_path: str) -> None:
    """Stand in for a Serve replica in a fresh process: open the version, query it, print RSS and latencies."""
    import numpy as np  # noqa: F401 - imported before the baseline, as a replica has it
    import usearch.index  # noqa: F401

    from embray import Collection
    from embray.config import parse_config

    spec = json.loads(Path(spec_path).read_text())
    texts = spec["texts"]
    col = Collection(parse_config(spec["config"], base_dir=Path(spec["work"])))
    gc.collect()
    base = proc_status("self")
    t = time.perf_counter()
    vi = col.index(spec["version"])
    vi.search_text([WARMUP_QUERY], k=1)  # loads the encoder and touches every shard
    load_s = time.perf_counter() - t
    loaded = proc_status("self")
    vecs = vi.embedder.embed_queries(texts)
    lat: dict[str, list[float]] = {"vector": [], "text": []}
    for kind in ("vector", "text"):
        for i in range(min(20, len(texts))):  # warm-up
            vi.search_vectors(vecs[i : i + 1], 10) if kind == "vector" else vi.search_text([texts[i]], 10)
        for i in range(len(texts)):
            t = time.perf_counter()
            vi.search_vectors(vecs[i : i + 1], 10) if kind == "vector" else vi.search_text([texts[i]], 10)
            lat[kind].append((time.perf_counter() - t) * 1000)
    index_bytes = sum(s.index.bytes for s in vi.manifest.shards if s.index)
    report = {"base": base, "loaded": loaded, "after": proc_status("self"), "load_s": load_s, "lat": lat}
    print(json.dumps({**report, "index_bytes": index_bytes, "rows": vi.manifest.rows}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        probe(sys.argv[2])
    else:
        main()
