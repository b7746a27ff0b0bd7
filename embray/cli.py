"""The ``embray`` command: parse, call the library, print; errors become one line and an exit code.

With ``--json`` a command prints JSON on stdout and nothing else (logs and
progress go to stderr), so scripts and monitoring can parse it.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING, Any

import click

from embray.errors import EmbrayError

if TYPE_CHECKING:
    from embray.results import BuildResult, Estimate, PlanResult, StatusReport

config_option = click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="embray YAML config file."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout and nothing else.")


def _emit(result: Any, as_json: bool, human: str) -> None:
    """Print a typed result: its ``to_dict()`` as JSON with --json (a list of results as a JSON array), else
    the human text rendered from the result."""
    if not as_json:
        click.echo(human)
        return
    obj = [r.to_dict() for r in result] if isinstance(result, list) else result.to_dict()
    click.echo(json.dumps(obj, indent=2, default=str))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _open(config_path: str, as_json: bool | None = None, *, show_log: bool = True):
    """The collection. For the commands that pass ``as_json`` on a terminal, without --json or --verbose: a live
    progress display, and everything else the process writes to stderr (embray's, Ray's and the libraries' log
    lines, Ray's core messages, model loading bars) in a log file, named when the command ends (``show_log``)."""
    from embray.collection import Collection

    ctx = click.get_current_context()
    verbose = (ctx.find_root().params or {}).get("verbose", False)
    if as_json is None or as_json or verbose or not sys.stderr.isatty():
        return Collection.open(config_path)
    from embray.progress import TerminalProgress

    terminal, log_file, restore = _stderr_to_log_file()

    def done() -> None:
        restore()
        if show_log:
            click.echo(f"log: {log_file} (--verbose shows it live)", err=True)

    ctx.call_on_close(done)
    return Collection.open(config_path, progress=TerminalProgress(terminal))


def _stderr_to_log_file():
    """Point this process's stderr (file descriptor 2: Python's logging and warnings, Ray's C++ core, tqdm) at a
    log file, and keep Ray workers' output in Ray's session logs. Returns (a stream on the terminal, the file's
    path, a function that puts stderr back)."""
    import os
    import tempfile
    import time

    from embray.runtime import quiet_workers

    folder = os.path.join(tempfile.gettempdir(), "embray-logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"embray-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log")
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    quiet_workers()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        terminal.close()

    return terminal, path, restore


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr (else, on a terminal: in a log file).")
def cli(verbose: bool) -> None:
    """Embeddings as a managed asset: versioned, fingerprinted indexes built by Ray, tracked in MLflow."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr, format=LOG_FORMAT)


@cli.command()
@config_option
@click.option("--no-promote", is_flag=True, help="Do not make the first version of the collection active.")
@json_option
def backfill(config_path: str, no_promote: bool, as_json: bool) -> None:
    """Embed the whole source corpus into a new version."""
    r = _open(config_path, as_json).backfill(promote=not no_promote)
    _emit(r, as_json, _build_human(r))


def _estimate_human(e: Estimate | None) -> str:
    if e is None:
        return ""
    size = f"{e.bytes_added / 1e6:.1f} MB" if e.bytes_added is not None else "unknown"
    shards = f"shards: {e.shards_rebuilt} rebuilt, {e.shards_updated} updated, {e.shards_reused} reused"
    if e.shards_delta:
        shards += f", {e.shards_delta} delta"
    if e.seconds is None:
        return f"\n  {shards}; store +{size}\n  time: {e.basis}"
    return (
        f"\n  {shards}; store +{size}\n  about {e.seconds:.0f} s, {e.cpu_hours:.3f} CPU-h, "
        f"{e.gpu_hours:.3f} GPU-h ({e.basis})"
    )


def _build_human(r: BuildResult) -> str:
    c = r.counts
    reasons = ", ".join(f"{n} {why}" for why, n in r.rejected_by_reason.items()) or "none"
    lineage = f" from {r.parent}" if r.parent else ""
    return (
        f"version {r.version}{lineage} committed: {r.rows} rows in {round(r.seconds, 3)}s\n"
        f"  new {c.new}, changed {c.changed}, deleted {c.deleted}, reused {c.reused}; "
        f"embedded {c.embedded} texts ({c.cache_hits} more came from the cache)\n"
        f"  fingerprint {r.fingerprint}, MLflow model version {r.model_version}"
        f"{', alias ' + ','.join(r.aliases) if r.aliases else ''}\n"
        f"  rejected {r.rejected} rows ({reasons})" + (f"; see {r.uri}/rejects/" if r.rejected else "") + f"\n  {r.uri}"
    )


def _dry_refresh_human(p: PlanResult) -> str:
    c = p.counts
    return (
        f"{p.parent} vs the source now: new {c.new}, changed {c.changed}, deleted {c.deleted}, "
        f"unchanged {c.reused}, rejected {p.rejected}; a refresh would embed "
        f"{p.to_embed} texts (dry run: nothing written)" + _estimate_human(p.estimate)
    )


@cli.command()
@config_option
@click.option("--from", "parent", default=None, help="Version to refresh (default: the active one).")
@click.option("--dry-run", is_flag=True, help="Only print what changed (the staleness); embed and write nothing.")
@click.option("--promote", "promote_it", is_flag=True, help="Make the refreshed version active (after verify).")
@json_option
def refresh(config_path: str, parent: str | None, dry_run: bool, promote_it: bool, as_json: bool) -> None:
    """Re-embed only the rows that changed since a version, into a child version."""
    r = _open(config_path, as_json).refresh(parent, dry_run=dry_run, promote=promote_it)
    _emit(r, as_json, _dry_refresh_human(r) if dry_run else _build_human(r))


@cli.command()
@config_option
@click.option("--version", "version", default=None, help="Version to compact (default: the active one).")
@click.option("--promote", "promote_it", is_flag=True, help="Make the compacted version active (through the gates).")
@json_option
def compact(config_path: str, version: str | None, promote_it: bool, as_json: bool) -> None:
    """Rebuild a version's shards that have delta segments or tombstones into one index each, as a child
    version with the same rows; nothing is re-embedded and the corpus is not read."""
    r = _open(config_path, as_json).compact(version, promote=promote_it)
    _emit(r, as_json, _build_human(r))


@cli.command()
@config_option
@click.option(
    "--model", "model_path", required=True, type=click.Path(dir_okay=False), help="YAML file: the new model spec."
)
@click.option("--dry-run", is_flag=True, help="Only print what it would embed and cost; embed and write nothing.")
@json_option
def migrate(config_path: str, model_path: str, dry_run: bool, as_json: bool) -> None:
    """Re-embed the whole collection with another model into a `candidate` version."""
    r = _open(config_path, as_json).migrate(model_path, dry_run=dry_run)
    if dry_run:
        human = (
            f"a migration to fingerprint {r.fingerprint} would embed {r.to_embed} texts "
            f"({r.counts.cache_hits} of the {r.rows} rows come from the cache) (dry run: nothing written)"
            + _estimate_human(r.estimate)
        )
    else:
        human = _build_human(r) + f"\n  promote it with `embray promote {r.version} --config {config_path}`"
    _emit(r, as_json, human)


@cli.command()
@click.argument("version")
@config_option
@json_option
def verify(version: str, config_path: str, as_json: bool) -> None:
    """Check a version: files and checksums, one fingerprint, row counts, unique ids."""
    r = _open(config_path).verify(version)
    problems = r.problems
    _emit(
        r,
        as_json,
        f"{version}: ok" if not problems else f"{version}: {len(problems)} problem(s)\n  " + "\n  ".join(problems),
    )
    if problems:
        sys.exit(1)


@cli.command()
@click.argument("version")
@config_option
@click.option("--reason", default="", help="Why; recorded in MLflow with who and when.")
@click.option("--force", is_flag=True, help="Override failed quality gates (never verify); needs --reason.")
@click.option("--queries", default=None, type=click.Path(dir_okay=False), help="Labelled JSONL for the nDCG gate.")
@json_option
def promote(version: str, config_path: str, reason: str, force: bool, queries: str | None, as_json: bool) -> None:
    """Make VERSION the active one once it passes the gates (verify, ANN recall, labelled nDCG)."""
    r = _open(config_path).promote(version, reason=reason, force=force, queries=queries)
    gates = ", ".join(f"{g.gate} {'ok' if g.passed else 'FAILED'}" for g in r.gates)
    forced = " (FORCED past failed gates)" if r.forced else ""
    _emit(r, as_json, f"active: {r.previous} -> {r.active}{forced}; gates: {gates}")


@cli.command()
@config_option
@click.option("--reason", default="", help="Why; recorded in MLflow with who and when.")
@json_option
def rollback(config_path: str, reason: str, as_json: bool) -> None:
    """Make the previously active version active again."""
    r = _open(config_path).rollback(reason=reason)
    _emit(r, as_json, f"active: {r.previous} -> {r.active}")


@cli.command()
@config_option
@click.option(
    "--keep", required=True, type=click.IntRange(1), help="Newest versions to keep (aliased ones always stay)."
)
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@json_option
def gc(config_path: str, keep: int, dry_run: bool, as_json: bool) -> None:
    """Delete old versions that no alias points at and no kept version reuses."""
    r = _open(config_path).gc(keep, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    _emit(
        r,
        as_json,
        f"kept {len(r.kept)} versions; {verb} {len(r.deleted)} versions "
        f"({', '.join(r.deleted) or 'none'}), {len(r.unfinished)} unfinished builds "
        f"and {len(r.caches)} vector caches of unused models",
    )


@cli.command()
@config_option
@click.option("--no-verify", is_flag=True, help="Skip verify of the aliased versions (it reads every file).")
@json_option
def status(config_path: str, no_verify: bool, as_json: bool) -> None:
    """Is the collection current, consistent and served as its alias says? Exit 1 when not."""
    r = _open(config_path, as_json).status(verify=not no_verify)
    _emit(r, as_json, _status_human(r))
    if not r.ok:
        sys.exit(1)


def _status_human(s: StatusReport) -> str:
    lines = [f"collection {s.collection}: {'OK' if s.ok else 'PROBLEMS'} (checked {s.checked_at})"]
    for alias, v in (("active", s.active), ("candidate", s.candidate)):
        if v is None:
            lines.append(f"  {alias:<9} -")
            continue
        segs = (
            f", {v.segments} delta segment(s) and {v.dead_rows} dead rows in {v.segmented_shards} shard(s)"
            if v.segmented_shards
            else ""
        )
        age = f"{v.age_s / 3600:.1f} h old"
        rows = f"{v.rows} passages of {v.documents} documents" if v.documents is not None else f"{v.rows} rows"
        lines.append(f"  {alias:<9} {v.id}  {v.model} ({v.fingerprint}), {rows}, {age}{segs}")
        if v.truncated_rows:
            lines.append(
                f"            {v.truncated_rows} rows longer than the model's window: {v.truncated_tokens} of their "
                "tokens are not embedded (chunk: embeds every passage of a long document)"
            )
    sh = s.shadow
    if sh:
        lines.append(
            f"  shadow    {sh.queries} live queries: overlap@10 with active {sh.overlap_at_10}, "
            f"candidate p50 {sh.p50_ms} ms, p99 {sh.p99_ms} ms ({sh.replicas} replica(s))"
        )
    st = s.staleness
    if st:
        oldest = f", oldest stale change {st.oldest_stale_at}" if st.oldest_stale_at else ""
        lines.append(f"  staleness {st.fraction:.2%}: {st.new} new, {st.changed} changed, {st.deleted} deleted{oldest}")
    if s.consistent is not None:
        lines.append(f"  verify    {'ok' if s.consistent else 'FAILED'} for {', '.join(s.verify) or '-'}")
    if s.served_matches is not None or s.served:
        lines.append(f"  served    {s.served or '-'} ({'matches active' if s.served_matches else 'NOT active'})")
    lines += [f"  problem: {p}" for p in s.problems]
    return "\n".join(lines)


@cli.command(name="eval")
@click.argument("version")
@config_option
@click.option("--against", default=None, help="Another version: overlap@10 of their results on sampled texts.")
@click.option("--queries", default=None, type=click.Path(dir_okay=False), help="Labelled JSONL: nDCG@10, recall@10.")
@click.option("--sample", default=None, type=click.IntRange(1), help="Sampled queries (default monitor.eval_sample).")
@json_option
def eval_(version: str, config_path: str, against: str | None, queries: str | None, sample: int | None, as_json: bool):
    """Measure VERSION: ANN recall@10 vs exact, overlap with another version, labelled nDCG@10."""
    r = _open(config_path, as_json).eval(version, against=against, queries=queries, sample=sample)
    human = [f"{version}: recall@10 {r.recall_at_10} (ANN vs exact, {r.recall_queries} queries)"]
    if r.overlap_at_10 is not None:
        human.append(f"  overlap@10 with {r.against}: {r.overlap_at_10} ({r.overlap_queries} texts)")
    if r.ndcg_at_10 is not None:
        human.append(
            f"  nDCG@10 {r.ndcg_at_10}, recall@10 {r.labelled_recall_at_10} ({r.labelled_queries} labelled queries)"
        )
    _emit(r, as_json, "\n".join(human))


@cli.command()
@click.argument("version")
@config_option
@click.option("--sample", default=None, type=click.IntRange(1), help="Rows to re-embed (default monitor.audit_sample).")
@click.option("--min-cosine", default=None, type=float, help="Threshold (default monitor.audit_min_cosine, 0.999).")
@click.option("--seed", default=None, type=int, help="Sample seed (default: a fresh random sample).")
@json_option
def audit(
    version: str, config_path: str, sample: int | None, min_cosine: float | None, seed: int | None, as_json: bool
):
    """Re-embed a sample of VERSION's rows and compare with the stored vectors; exit 1 on drift."""
    r = _open(config_path, as_json).audit(version, sample=sample, min_cosine=min_cosine, seed=seed)
    human = (
        f"{version}: {'ok' if r.ok else 'DRIFT'}: {r.compared} rows re-embedded, min cosine "
        f"{r.min_cosine}, mean {r.mean_cosine} (threshold {r.threshold}); "
        f"{r.source_changed} changed and {r.source_missing} missing in the source, skipped"
    )
    _emit(r, as_json, "\n  ".join([human, *r.problems]))
    if not r.ok:
        sys.exit(1)


@cli.command()
@config_option
@click.option("--interval", default=None, type=click.FloatRange(min=0), help="Seconds between checks.")
@click.option("--iterations", default=None, type=click.IntRange(1), help="Stop after N checks (default: run on).")
@click.option("--once", is_flag=True, help="One check (same as --iterations 1).")
@click.option("--promote-if-gates-pass", is_flag=True, help="Promote what a refresh built, through the gates.")
@json_option
def monitor(
    config_path: str,
    interval: float | None,
    iterations: int | None,
    once: bool,
    promote_if_gates_pass: bool,
    as_json: bool,
) -> None:
    """Check status on an interval, log it to MLflow, and refresh when staleness passes the threshold."""

    def show(report: StatusReport) -> None:  # one line per check, as it happens (JSON Lines with --json)
        if as_json:
            click.echo(json.dumps(report.to_dict(), default=str))
            return
        a = report.action.to_dict() if report.action else {}
        did = ", ".join(f"{k} {v}" for k, v in a.items() if v) or "no action"
        click.echo(f"{report.checked_at} {'ok' if report.ok else '; '.join(report.problems)}; {did}")

    _open(config_path).monitor(
        interval_s=interval,
        iterations=1 if once else iterations,
        promote_if_gates_pass=promote_if_gates_pass,
        on_check=show,
    )


@cli.command()
@config_option
@json_option
def versions(config_path: str, as_json: bool) -> None:
    """List the committed versions of the collection, oldest first."""
    rows = _open(config_path).versions()
    lines = [f"{'VERSION':<29} {'ROWS':>9}  {'FINGERPRINT':<24}  {'CREATED':<29} {'ALIASES':<18} {'CHUNK':<8} MODEL"]
    for v in rows:
        chunk = f"{v.chunk['tokens']}/{v.chunk['overlap']}" if v.chunk else "none"
        lines.append(
            f"{v.id:<29} {v.rows:>9}  {v.fingerprint:<24}  {v.created:<29} {','.join(v.aliases) or '-':<18} "
            f"{chunk:<8} {v.model}"
        )
    _emit(rows, as_json, "\n".join(lines) if rows else "no versions yet: run `embray backfill`")


@cli.command()
@config_option
@click.argument("query")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000), help="Results to return.")
@click.option("--version", "version", default=None, help="Search this version instead of the active one.")
@click.option("--chunks", is_flag=True, help="Chunked documents: list the top passages, not documents.")
@click.option(
    "--filter",
    "filter_",
    default=None,
    metavar="JSON",
    help='Only rows whose metadata matches, e.g. \'{"tenant": "acme", "year": {"$gte": 2024}}\' (source.columns).',
)
@click.option("--fields", default=None, metavar="A,B", help="Stored columns (and text) to show with each hit.")
@click.option(
    "--mode",
    type=click.Choice(["vector", "keyword", "hybrid"]),
    default="vector",
    show_default=True,
    help="keyword: BM25; hybrid: both, fused by reciprocal rank (a version built with index.keywords).",
)
@json_option
def search(
    config_path: str,
    query: str,
    k: int,
    version: str | None,
    chunks: bool,
    filter_: str | None,
    fields: str | None,
    mode: str,
    as_json: bool,
) -> None:
    """Search the active version with QUERY, embedded by that version's own model. In a version of chunked
    documents each hit is a document, shown with the passage (ordinal, characters start-end) that scored."""
    col = _open(config_path, as_json, show_log=False)
    names = [f.strip() for f in fields.split(",") if f.strip()] if fields is not None else None
    res = col.search(query, k=k, version=version, chunks=chunks, filter=filter_, fields=names, mode=mode)
    human = [f"version {res.version} ({col.index(res.version).manifest.model.label}, fingerprint {res.fingerprint})"]
    for h in res.results:
        at = f"  (passage {h.chunk.ordinal}, characters {h.chunk.start}-{h.chunk.end})" if h.chunk else ""
        human.append(f"{h.score:8.4f}  {h.id}{at}")
        human += [f"          {name}: {value!r}" for name, value in (h.fields or {}).items()]
    _emit(res, as_json, "\n".join(human))


@cli.command()
@config_option
@click.option("--host", default=None, help="Listen address (default: serve.host, 127.0.0.1).")
@click.option("--port", default=None, type=click.IntRange(1, 65535), help="HTTP port (default: serve.port, 8000).")
@click.option("--haproxy", is_flag=True, help="HAProxy ingress instead of Serve's Python proxy (lower latency).")
def serve(config_path: str, host: str | None, port: int | None, haproxy: bool) -> None:
    """Serve the active version over HTTP on a Ray Serve app; Ctrl-C stops it (exit 130; SIGTERM: 143).

    A configuration whose replicas this Ray cannot hold is refused at once on a local Ray (exit 2, naming the
    shortfall); on a cluster it waits up to serve.placement_timeout_s for nodes."""
    from embray.config import load_config
    from embray.serving.launch import run_blocking

    cfg = load_config(config_path)
    cfg = cfg.model_copy(
        update={"serve": cfg.serve.model_copy(update={"host": host or cfg.serve.host, "port": port or cfg.serve.port})}
    )
    code = run_blocking(cfg, haproxy=haproxy)
    if code:
        sys.exit(code)


@cli.command()
@click.option("--out", default="demo", show_default=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--docs", default=6000, show_default=True, type=click.IntRange(10), help="Documents to collect.")
@click.option("--files", default=8, show_default=True, type=click.IntRange(1), help="Parquet files to shard into.")
def demo(out: str, docs: int, files: int) -> None:
    """Write a demo corpus (Python standard library docstrings) and a config that uses it."""
    from embray.demo import write_demo

    config, n = write_demo(out, docs=docs, files=files)
    click.echo(f"wrote {n} documents in {files} Parquet files and {config}")


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="embray", standalone_mode=False)
    except EmbrayError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
