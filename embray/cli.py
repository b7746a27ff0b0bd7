"""The ``embray`` command: parse, call the library, print; errors become one line and an exit code.

With ``--json`` a command prints JSON on stdout and nothing else (logs and
progress go to stderr), so scripts and monitoring can parse it.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from embray.errors import EmbrayError

config_option = click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="embray YAML config file."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout and nothing else.")


def _emit(obj: Any, as_json: bool, human: str) -> None:
    click.echo(json.dumps(obj, indent=2, default=str) if as_json else human)


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
    s = _open(config_path, as_json).backfill(promote=not no_promote).to_dict()
    _emit(s, as_json, _build_human(s))


def _estimate_human(e: dict[str, Any]) -> str:
    size = f"{e['bytes_added'] / 1e6:.1f} MB" if e["bytes_added"] is not None else "unknown"
    shards = f"shards: {e['shards_rebuilt']} rebuilt, {e['shards_updated']} updated, {e['shards_reused']} reused"
    if e.get("shards_delta"):
        shards += f", {e['shards_delta']} delta"
    if e["seconds"] is None:
        return f"\n  {shards}; store +{size}\n  time: {e['basis']}"
    return (
        f"\n  {shards}; store +{size}\n  about {e['seconds']:.0f} s, {e['cpu_hours']:.3f} CPU-h, "
        f"{e['gpu_hours']:.3f} GPU-h ({e['basis']})"
    )


def _build_human(s: dict[str, Any]) -> str:
    reasons = ", ".join(f"{n} {r}" for r, n in s["rejected_by_reason"].items()) or "none"
    lineage = f" from {s['parent']}" if s.get("parent") else ""
    return (
        f"version {s['version']}{lineage} committed: {s['rows']} rows in {s['seconds']}s\n"
        f"  new {s['new']}, changed {s['changed']}, deleted {s['deleted']}, reused {s['reused']}; "
        f"embedded {s['embedded']} texts ({s['cache_hits']} more came from the cache)\n"
        f"  fingerprint {s['fingerprint']}, MLflow model version {s['model_version']}"
        f"{', alias ' + ','.join(s['aliases']) if s['aliases'] else ''}\n"
        f"  rejected {s['rejected']} rows ({reasons})"
        + (f"; see {s['uri']}/rejects/" if s["rejected"] else "")
        + f"\n  {s['uri']}"
    )


@cli.command()
@config_option
@click.option("--from", "parent", default=None, help="Version to refresh (default: the active one).")
@click.option("--dry-run", is_flag=True, help="Only print what changed (the staleness); embed and write nothing.")
@click.option("--promote", "promote_it", is_flag=True, help="Make the refreshed version active (after verify).")
@json_option
def refresh(config_path: str, parent: str | None, dry_run: bool, promote_it: bool, as_json: bool) -> None:
    """Re-embed only the rows that changed since a version, into a child version."""
    s = _open(config_path, as_json).refresh(parent, dry_run=dry_run, promote=promote_it).to_dict()
    if dry_run:
        _emit(
            s,
            as_json,
            f"{s['parent']} vs the source now: new {s['new']}, changed {s['changed']}, deleted {s['deleted']}, "
            f"unchanged {s['reused']}, rejected {s['rejected']}; a refresh would embed "
            f"{s['to_embed']} texts (dry run: nothing written)" + _estimate_human(s["estimate"]),
        )
        return
    _emit(s, as_json, _build_human(s))


@cli.command()
@config_option
@click.option("--version", "version", default=None, help="Version to compact (default: the active one).")
@click.option("--promote", "promote_it", is_flag=True, help="Make the compacted version active (through the gates).")
@json_option
def compact(config_path: str, version: str | None, promote_it: bool, as_json: bool) -> None:
    """Rebuild a version's shards that have delta segments or tombstones into one index each, as a child
    version with the same rows; nothing is re-embedded and the corpus is not read."""
    s = _open(config_path, as_json).compact(version, promote=promote_it).to_dict()
    _emit(s, as_json, _build_human(s))


@cli.command()
@config_option
@click.option(
    "--model", "model_path", required=True, type=click.Path(dir_okay=False), help="YAML file: the new model spec."
)
@click.option("--dry-run", is_flag=True, help="Only print what it would embed and cost; embed and write nothing.")
@json_option
def migrate(config_path: str, model_path: str, dry_run: bool, as_json: bool) -> None:
    """Re-embed the whole collection with another model into a `candidate` version."""
    s = _open(config_path, as_json).migrate(model_path, dry_run=dry_run).to_dict()
    if dry_run:
        _emit(
            s,
            as_json,
            f"a migration to fingerprint {s['fingerprint']} would embed {s['to_embed']} texts "
            f"({s['cache_hits']} of the {s['rows']} rows come from the cache) (dry run: nothing written)"
            + _estimate_human(s["estimate"]),
        )
        return
    _emit(s, as_json, _build_human(s) + f"\n  promote it with `embray promote {s['version']} --config {config_path}`")


@cli.command()
@click.argument("version")
@config_option
@json_option
def verify(version: str, config_path: str, as_json: bool) -> None:
    """Check a version: files and checksums, one fingerprint, row counts, unique ids."""
    out = _open(config_path).verify(version).to_dict()
    problems = out["problems"]
    _emit(
        out,
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
    out = _open(config_path).promote(version, reason=reason, force=force, queries=queries).to_dict()
    gates = ", ".join(f"{g['gate']} {'ok' if g['passed'] else 'FAILED'}" for g in out["gates"])
    forced = " (FORCED past failed gates)" if out["forced"] else ""
    _emit(out, as_json, f"active: {out['previous']} -> {out['active']}{forced}; gates: {gates}")


@cli.command()
@config_option
@click.option("--reason", default="", help="Why; recorded in MLflow with who and when.")
@json_option
def rollback(config_path: str, reason: str, as_json: bool) -> None:
    """Make the previously active version active again."""
    out = _open(config_path).rollback(reason=reason).to_dict()
    _emit(out, as_json, f"active: {out['previous']} -> {out['active']}")


@cli.command()
@config_option
@click.option(
    "--keep", required=True, type=click.IntRange(1), help="Newest versions to keep (aliased ones always stay)."
)
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@json_option
def gc(config_path: str, keep: int, dry_run: bool, as_json: bool) -> None:
    """Delete old versions that no alias points at and no kept version reuses."""
    out = _open(config_path).gc(keep, dry_run=dry_run).to_dict()
    verb = "would delete" if dry_run else "deleted"
    _emit(
        out,
        as_json,
        f"kept {len(out['kept'])} versions; {verb} {len(out['deleted'])} versions "
        f"({', '.join(out['deleted']) or 'none'}), {len(out['unfinished'])} unfinished builds "
        f"and {len(out['caches'])} vector caches of unused models",
    )


@cli.command()
@config_option
@click.option("--no-verify", is_flag=True, help="Skip verify of the aliased versions (it reads every file).")
@json_option
def status(config_path: str, no_verify: bool, as_json: bool) -> None:
    """Is the collection current, consistent and served as its alias says? Exit 1 when not."""
    out = _open(config_path, as_json).status(verify=not no_verify).to_dict()
    _emit(out, as_json, _status_human(out))
    if not out["ok"]:
        sys.exit(1)


def _status_human(s: dict[str, Any]) -> str:
    lines = [f"collection {s['collection']}: {'OK' if s['ok'] else 'PROBLEMS'} (checked {s['checked_at']})"]
    for alias in ("active", "candidate"):
        v = s.get(alias)
        age = f"{v['age_s'] / 3600:.1f} h old" if v else ""
        segs = (
            f", {v['segments']} delta segment(s) and {v['dead_rows']} dead rows in {v['segmented_shards']} shard(s)"
            if v and v.get("segmented_shards")
            else ""
        )
        lines.append(
            f"  {alias:<9} {v['id']}  {v['model']} ({v['fingerprint']}), {v['rows']} rows, {age}{segs}"
            if v
            else f"  {alias:<9} -"
        )
    sh = s.get("shadow")
    if sh:
        lines.append(
            f"  shadow    {sh['queries']} live queries: overlap@10 with active {sh['overlap_at_10']}, "
            f"candidate p50 {sh['p50_ms']} ms, p99 {sh['p99_ms']} ms ({sh['replicas']} replica(s))"
        )
    st = s.get("staleness")
    if st:
        oldest = f", oldest stale change {st['oldest_stale_at']}" if st["oldest_stale_at"] else ""
        lines.append(
            f"  staleness {st['fraction']:.2%}: {st['new']} new, {st['changed']} changed, "
            f"{st['deleted']} deleted{oldest}"
        )
    if s.get("consistent") is not None:
        lines.append(f"  verify    {'ok' if s['consistent'] else 'FAILED'} for {', '.join(s['verify']) or '-'}")
    if s.get("served_matches") is not None or s.get("served"):
        lines.append(f"  served    {s['served'] or '-'} ({'matches active' if s['served_matches'] else 'NOT active'})")
    lines += [f"  problem: {p}" for p in s["problems"]]
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
    out = _open(config_path, as_json).eval(version, against=against, queries=queries, sample=sample).to_dict()
    human = [f"{version}: recall@10 {out['recall_at_10']} (ANN vs exact, {out['recall_queries']} queries)"]
    if "overlap_at_10" in out:
        human.append(f"  overlap@10 with {out['against']}: {out['overlap_at_10']} ({out['overlap_queries']} texts)")
    if "ndcg_at_10" in out:
        human.append(
            f"  nDCG@10 {out['ndcg_at_10']}, recall@10 {out['labelled_recall_at_10']} "
            f"({out['labelled_queries']} labelled queries)"
        )
    _emit(out, as_json, "\n".join(human))


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
    out = _open(config_path, as_json).audit(version, sample=sample, min_cosine=min_cosine, seed=seed).to_dict()
    human = (
        f"{version}: {'ok' if out['ok'] else 'DRIFT'}: {out['compared']} rows re-embedded, min cosine "
        f"{out['min_cosine']}, mean {out['mean_cosine']} (threshold {out['threshold']}); "
        f"{out['source_changed']} changed and {out['source_missing']} missing in the source, skipped"
    )
    _emit(out, as_json, "\n  ".join([human, *out["problems"]]))
    if not out["ok"]:
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

    def show(report) -> None:  # one line per check, as it happens (JSON Lines with --json)
        r = report.to_dict()
        if as_json:
            click.echo(json.dumps(r, default=str))
            return
        a = r.get("action") or {}
        did = ", ".join(f"{k} {v}" for k, v in a.items() if v) or "no action"
        click.echo(f"{r.get('checked_at', '')} {'ok' if r['ok'] else '; '.join(r['problems'])}; {did}")

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
    rows = [v.to_dict() for v in _open(config_path).versions()]
    lines = [f"{'VERSION':<29} {'ROWS':>9}  {'FINGERPRINT':<24}  {'CREATED':<29} {'ALIASES':<18} MODEL"]
    for r in rows:
        lines.append(
            f"{r['id']:<29} {r['rows']:>9}  {r['fingerprint']:<24}  {r['created']:<29} "
            f"{','.join(r['aliases']) or '-':<18} {r['model']}"
        )
    _emit(rows, as_json, "\n".join(lines) if rows else "no versions yet: run `embray backfill`")


@cli.command()
@config_option
@click.argument("query")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000), help="Results to return.")
@click.option("--version", "version", default=None, help="Search this version instead of the active one.")
@json_option
def search(config_path: str, query: str, k: int, version: str | None, as_json: bool) -> None:
    """Search the active version with QUERY, embedded by that version's own model."""
    col = _open(config_path, as_json, show_log=False)
    res = col.search(query, k=k, version=version)
    out = res.to_dict()
    human = [f"version {res.version} ({col.index(res.version).manifest.model.label}, fingerprint {res.fingerprint})"]
    human += [f"{h.score:8.4f}  {h.id}" for h in res.results]
    _emit(out, as_json, "\n".join(human))


@cli.command()
@config_option
@click.option("--host", default=None, help="Listen address (default: serve.host, 127.0.0.1).")
@click.option("--port", default=None, type=click.IntRange(1, 65535), help="HTTP port (default: serve.port, 8000).")
@click.option("--haproxy", is_flag=True, help="HAProxy ingress instead of Serve's Python proxy (lower latency).")
def serve(config_path: str, host: str | None, port: int | None, haproxy: bool) -> None:
    """Serve the active version over HTTP on a Ray Serve app; Ctrl-C stops it."""
    from embray.config import load_config
    from embray.serving.launch import run_blocking

    cfg = load_config(config_path)
    cfg = cfg.model_copy(
        update={"serve": cfg.serve.model_copy(update={"host": host or cfg.serve.host, "port": port or cfg.serve.port})}
    )
    run_blocking(cfg, haproxy=haproxy)


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
