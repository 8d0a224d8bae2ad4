"""The click CLI: parse, call one library function, map errors to exit codes.

Human progress and logs go to stderr; the final report goes to stdout, as a summary for a person
or, with `--json`, as one JSON object.
"""

import contextlib
import functools
import json
import logging
import signal
import sys
import threading

import click

from pushagent import __version__
from pushagent.cluster.tls import insecure_warning
from pushagent.config import load_config, parse_duration
from pushagent.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PushAgentError, StopRequested
from pushagent.inputs.shard import parse_shard
from pushagent.ops.doctor import Doctor
from pushagent.ops.doctor import as_json as doctor_report
from pushagent.ops.doctor import healthy
from pushagent.ops.logs import redact, setup_logging
from pushagent.ops.memory import return_large_buffers_to_os
from pushagent.ops.observe import observing
from pushagent.ops.status import EXIT_CODES, format_status, health_report
from pushagent.ops.summary import format_table, summary_lines
from pushagent.runs.push import PushOptions, PushRun
from pushagent.runs.verify import VerifyOptions, verify_batch
from pushagent.state.records import AuditLog, SyncStateStore, audit_state

log = logging.getLogger("pushagent")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def config_options(command):
    """--config, --json, --debug and the log options, shared by every command."""
    @click.option("--config", "config_file", type=click.Path(dir_okay=False),
                  help="YAML configuration [./pushagent.yaml, then ~/.config/pushagent/config.yaml].")
    @click.option("--json", "as_json", is_flag=True, help="Print the final report as one JSON object on stdout.")
    @click.option("--debug", is_flag=True, help="Verbose logs and tracebacks on stderr.")
    @click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
                  envvar="PUSHAGENT_LOG_FORMAT", help="Logs on stderr as text, or one JSON object per line.")
    @click.option("-v", "--verbose", count=True, help="Also log debug lines (one per chunk in text logs).")
    @click.option("-q", "--quiet", is_flag=True, help="Log only warnings and errors; no progress.")
    @functools.wraps(command)
    def wrapper(*args, debug, log_format, verbose, quiet, **kwargs):
        setup_logging(log_format, verbose + debug, quiet and not debug)
        try:
            return command(*args, **kwargs)
        except PushAgentError as error:
            _fail(str(error), error.exit_code, debug)
        except OSError as error:
            _fail(f"{error.filename or ''}: {error.strerror or error}", EXIT_FAILURE, debug)
    return wrapper


def connection_options(command):
    """Flags for the most used keys; each overrides PUSHAGENT_<KEY> and the config file."""
    options = [
        click.option("--url", help="Cluster base URL, e.g. https://search.example.org:9200."),
        click.option("--index", help="Target index when records do not name one."),
        click.option("--state-dir", help="Checkpoints, queue.db, sync-state and audit log."),
        click.option("--insecure", is_flag=True, default=None, help="Allow plain http:// to a non-loopback host."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def sending_options(command):
    """How requests are cut and how many fly at once: push and drain."""
    options = [
        click.option("--chunk-docs", type=int, help="Documents per bulk request [5000]."),
        click.option("--concurrency", type=int, help="Bulk requests in flight at the start; the sender adapts [2]."),
        click.option("--max-concurrency", type=int, help="The most bulk requests in flight it goes to [8]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _fail(message: str, exit_code: int, debug: bool) -> None:
    if debug:
        log.exception("failed")
    click.echo(f"pushagent: error: {redact(message)}", err=True)
    sys.exit(exit_code)


def _parse_shard(ctx, param, value):
    try:
        return parse_shard(value) if value else None
    except PushAgentError as error:
        raise click.BadParameter(error.message) from None


def _parse_duration(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _flags(**values) -> dict:
    return {key: value for key, value in values.items() if value is not None}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pushagent")
def cli():
    """Push JSONL batches from a firewalled cluster into Elasticsearch/OpenSearch, nothing lost."""


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@config_options
@connection_options
@click.option("--embedding-version", help="Value stamped into each document's embedding_version field.")
@click.option("--batch-id", help="Name of the batch (resume a named batch) [derived from the inputs].")
@click.option("--batch-time", help="Generation time of the batch, ISO 8601 [newest input mtime].")
@click.option("--id-field", help="Record field holding the document id [id].")
@sending_options
@click.option("--restart", is_flag=True, help="Ignore saved progress and push the batch from the start.")
@click.option("--from-line", type=click.IntRange(min=1), help="Start at this line of the first input.")
@click.option("--on-error", type=click.Choice(["continue", "stop"]), default="continue", show_default=True,
              help="stop: read no line after the first quarantined one; after a document the cluster refuses "
                   "(dead-lettered), send no further chunk (the rest of its chunk and chunks in flight were sent). "
                   "Exit 3; the same command resumes after what was sent.")
@click.option("--dry-run", "dry_run", type=click.Path(file_okay=False),
              help="Write the NDJSON request bodies to this directory; send nothing.")
@click.option("--no-verify", is_flag=True, help="Skip the count, sample and timestamp checks at the end.")
@click.option("--shard", metavar="K/N", callback=_parse_shard,
              help="Push only part K (0-based) of N of the inputs, for Slurm arrays; the parts share the batch id.")
@click.option("--snapshot", is_flag=True, default=None,
              help="The batch is the whole index: verification also counts its embedding version and fails "
                   "on documents it does not hold.")
@click.option("--incremental", is_flag=True, default=None,
              help="Send only documents the cluster does not hold with the same content and stamps "
                   "(one _mget per chunk, counted against the rate limit); the others count as unchanged.")
def push(inputs, config_file, as_json, url, index, state_dir, insecure, embedding_version, batch_id,
         batch_time, id_field, chunk_docs, concurrency, max_concurrency, restart, from_line, on_error, dry_run,
         no_verify, shard, snapshot, incremental):
    """Push INPUT files (JSONL, .jsonl.gz, globs, s3://bucket/key, s3://bucket/prefix/) into the cluster.

    Resumes by itself when a checkpoint for the same inputs exists.

    Example:

        pushagent push --index words --id-field ipa_id data/*.jsonl.gz
        pushagent push --index words --id-field ipa_id s3://batches/2026-11/

        pushagent push --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT data/*.jsonl.gz
    """
    config = load_config(config_file, _flags(url=url, index=index, state_dir=state_dir, insecure=insecure,
                                             embedding_version=embedding_version, batch_time=batch_time,
                                             id_field=id_field, chunk_docs=chunk_docs, concurrency=concurrency,
                                             max_concurrency=max_concurrency, snapshot=snapshot,
                                             incremental=incremental))
    _warn_insecure(config)
    options = PushOptions(list(inputs), batch_id=batch_id, restart=restart, from_line=from_line,
                          on_error=on_error, dry_run=dry_run, verify=not no_verify, shard=shard)
    with observing(config) as observers:
        result = _run_until_signal(PushRun(config, options, observers=observers))
    _report_and_exit(result, as_json)


@cli.command()
@config_options
@connection_options
def doctor(config_file, as_json, url, index, state_dir, insecure):
    """Check connectivity, TLS, credentials, privileges, queue, disk and clock before a long push.

    Exits 0 when every needed check passes, 1 otherwise.

    Example:

        pushagent doctor --url https://search.example.org:9200 --index words
    """
    config = load_config(config_file, _flags(url=url, index=index, state_dir=state_dir, insecure=insecure))
    _warn_insecure(config)
    checks = Doctor(config).run()
    if as_json:
        click.echo(json.dumps(doctor_report(checks), sort_keys=True))
    else:
        click.echo("\n".join(f"{c.status:<5} {c.name:<24} {c.detail}" for c in checks))
    sys.exit(0 if healthy(checks) else EXIT_FAILURE)


def _warn_insecure(config) -> None:
    warning = insecure_warning(config)
    if warning:
        log.warning(warning)


@cli.command()
@config_options
@click.option("--state-dir", help="Checkpoints, queue.db, sync-state and audit log.")
def status(config_file, as_json, state_dir):
    """Health of the agent: last run, queue depth, sync lag; exit 0 healthy, 1 warning, 2 critical.

    Thresholds: health_lag_warning/critical and health_dead_warning/critical.

    Example:

        pushagent status --json > health.json || echo "pushagent needs a look"
    """
    config = load_config(config_file, _flags(state_dir=state_dir))
    report = health_report(config)
    click.echo(json.dumps(report, indent=1, sort_keys=True) if as_json else format_status(report))
    sys.exit(EXIT_CODES[report["health"]])


def queue_options(command):
    """Where the queue is: --state-dir (for the default SQLite queue) and --queue-url."""
    command = click.option("--queue-url", help="sqlite:///path or redis://host:port/db [sqlite in state_dir].")(command)
    return click.option("--state-dir", help="Checkpoints, queue.db, sync-state and audit log.")(command)


@cli.command()
@config_options
@queue_options
@click.option("--url", help="Cluster base URL, e.g. https://search.example.org:9200.")
@click.option("--insecure", is_flag=True, default=None, help="Allow plain http:// to a non-loopback host.")
@click.option("--all", "all_items", is_flag=True, help="Send pending items now, ignoring their next-attempt time.")
@click.option("--batch-id", help="Only items of this batch.")
@click.option("--max-items", type=click.IntRange(min=1), help="Take at most this many items.")
@sending_options
@click.option("--wait", "wait", callback=_parse_duration, default="0",
              help="Keep waiting this long (e.g. 10m) for items of the scope to fall due [0: do not wait].")
def drain(config_file, as_json, state_dir, queue_url, url, insecure, all_items, batch_id, max_items, chunk_docs,
          concurrency, max_concurrency, wait):
    """Push the due items of the retry queue; exit 0 when none remain, 3 when items stay pending or dead.

    Several drainers may share one queue (e.g. Slurm array tasks on one Redis).
    With --all, an item that fails again waits for its next attempt; --wait
    keeps the drain running until then (up to its limit).

    Example:

        pushagent drain --all --wait 10m --batch-id words-2026-01 --json
    """
    from pushagent.runs.drain import DrainOptions, DrainRun
    config = load_config(config_file, _flags(state_dir=state_dir, queue_url=queue_url, url=url, insecure=insecure,
                                             chunk_docs=chunk_docs, concurrency=concurrency,
                                             max_concurrency=max_concurrency))
    _warn_insecure(config)
    options = DrainOptions(all=all_items, batch_id=batch_id, max_items=max_items, wait=wait)
    result = _run_until_signal(DrainRun(config, options))
    _report_and_exit(result, as_json)


@cli.group()
def queue():
    """Inspect and manage the retry queue: stats, list, requeue-dead, purge."""


def _with_queue(config_file, state_dir, queue_url, action):
    from pushagent.state.retry_queue import configured_queue
    with configured_queue(load_config(config_file, _flags(state_dir=state_dir, queue_url=queue_url))) as retry_queue:
        return action(retry_queue)


@queue.command("stats")
@config_options
@queue_options
def queue_stats(config_file, as_json, state_dir, queue_url):
    """Pending (due now, later), leased and dead items, oldest item age, per batch.

    Example:

        pushagent queue stats --json
    """
    from pushagent.ops.queue_view import EMPTY_STATS, format_stats, read_queue
    config = load_config(config_file, _flags(state_dir=state_dir, queue_url=queue_url))
    stats = read_queue(config, lambda q: q.stats(), EMPTY_STATS)
    click.echo(json.dumps(stats, sort_keys=True) if as_json else format_stats(stats))


@queue.command("list")
@config_options
@queue_options
@click.option("--status", type=click.Choice(["pending", "dead"]), help="Only items of this status.")
@click.option("--batch-id", help="Only items of this batch.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many.")
def queue_list(config_file, as_json, state_dir, queue_url, status, batch_id, limit):
    """Items, oldest first, with their input file, line and last error.

    Example:

        pushagent queue list --status dead --limit 20
    """
    from pushagent.ops.queue_view import format_items, item_summary, read_queue
    config = load_config(config_file, _flags(state_dir=state_dir, queue_url=queue_url))
    items = read_queue(config, lambda q: q.list(status, limit, batch_id), [])
    click.echo(json.dumps([item_summary(i) for i in items]) if as_json else format_items(items))


@queue.command("requeue-dead")
@config_options
@queue_options
@click.option("--batch-id", help="Only items of this batch.")
def queue_requeue_dead(config_file, as_json, state_dir, queue_url, batch_id):
    """Make dead documents pending and due now (attempts reset); quarantined lines stay dead.

    Example:

        pushagent queue requeue-dead --batch-id words-2026-01 && pushagent drain
    """
    requeued = _with_queue(config_file, state_dir, queue_url, lambda q: q.requeue_dead(batch_id))
    click.echo(json.dumps({"requeued": requeued}) if as_json else f"{requeued} items requeued")


@queue.command("purge")
@config_options
@queue_options
@click.option("--batch-id", help="Only dead items of this batch.")
@click.option("--reason", help="Only dead items whose last error contains this text.")
@click.option("--older-than", callback=_parse_duration, help="Only dead items queued longer ago than this (e.g. 7d).")
def queue_purge(config_file, as_json, state_dir, queue_url, batch_id, reason, older_than):
    """Delete dead-lettered items (documents and quarantined lines) matching every given filter.

    Use it once the cause is dealt with, e.g. the data fixed and pushed again
    (a later successful write of an id also clears its items by itself).
    Each purge is an entry of the audit log.

    Example:

        pushagent queue purge --batch-id words-2026-01 --reason mapper_parsing_exception
    """
    from pushagent.state.purge import purge_dead
    config = load_config(config_file, _flags(state_dir=state_dir, queue_url=queue_url))
    entry = _with_queue(config_file, state_dir, queue_url,
                        lambda q: purge_dead(q, config.state_path, batch_id, reason, older_than))
    click.echo(json.dumps(entry, sort_keys=True) if as_json else f"{entry['purged']} dead items purged")


class _stop_on_signals:
    """SIGUSR1/SIGTERM/SIGINT: stop taking chunks, finish in-flight ones, checkpoint, exit 75."""

    def __init__(self, run):
        self.run = run
        self._previous = {}
        self._received = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        name = signal.Signals(number).name
        if self._received:
            log.info("%s received: already stopping", name)
        else:
            log.warning("%s received: finishing requests in flight, then saving the checkpoint", name)
        self._received = True
        self.run.request_stop(name)
        if getattr(self.run, "interruptible", False):
            raise StopRequested(name)

    def __exit__(self, *exc):
        # Once stopping, keep the handlers: the same signal often comes twice (Slurm signals every
        # process of a job, and the batch script forwards it) and must not kill the process with the
        # default action while it prints its report and exits 75.
        if self._received:
            return
        for number, handler in self._previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def _interrupt_on_signals():
    """SIGUSR1/SIGTERM/SIGINT stop `verify` at once with exit 75: it has changed nothing yet, and the same
    command, run again, starts over (Slurm's requeue wrapper does so)."""
    def interrupt(number, frame):
        raise StopRequested(signal.Signals(number).name)
    previous = {number: signal.signal(number, interrupt) for number in STOP_SIGNALS}
    try:
        yield
    except StopRequested as stop:
        for number in STOP_SIGNALS:        # a second signal must not kill the process while it exits
            signal.signal(number, signal.SIG_IGN)
        click.echo(f"pushagent: verification interrupted by {stop}: nothing was recorded; run the same command "
                   "again", err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        for number, handler in previous.items():
            if signal.getsignal(number) is not signal.SIG_IGN:
                signal.signal(number, handler)


def _run_until_signal(run):
    """run.run() with the stop signals turned into run.request_stop()."""
    with _stop_on_signals(run):
        return run.run()


def _report_and_exit(result, as_json: bool) -> None:
    _print_report(result.report(), as_json)
    if result.error:
        click.echo(f"pushagent: error: {redact(str(result.error))}", err=True)
    sys.exit(result.exit_code)


def _print_report(report: dict, as_json: bool) -> None:
    click.echo(json.dumps(report, sort_keys=True) if as_json else "\n".join(summary_lines(report)))


@cli.command()
@config_options
@connection_options
@click.option("--batch-id", help="Verify this batch, from its sync-state record.")
@click.option("--embedding-version", help="Verify the documents stamped with this embedding version.")
@click.option("--expected-count", type=click.IntRange(min=0), help="Distinct documents expected (without --source).")
@click.option("--source", "sources", multiple=True, help="Source file (JSONL, .jsonl.gz, glob); repeatable.")
@click.option("--id-field", help="Record field holding the document id [id] (with --source).")
@click.option("--batch-time", help="Generation time of the sources, ISO 8601 [newest source mtime].")
@click.option("--expected-date", help="Documents last updated before this ISO 8601 date are stale [batch time].")
@click.option("--full", is_flag=True, help="Scan every id and checksum of the index and diff it with the source.")
@click.option("--enqueue-missing", is_flag=True, help="With --full: put missing documents into the retry queue.")
@click.option("--repair", is_flag=True,
              help="With --full: queue missing and changed documents; `drain` sends them with a version that wins "
                   "over edits and deletes made by hand, never over a later batch.")
@click.option("--recompute", is_flag=True,
              help="With --full: fetch every _source and recompute its checksum instead of reading the stamp.")
@click.option("--snapshot", is_flag=True,
              help="Verify the batch as the whole index: its embedding version's count and extra documents count.")
@click.option("--delete-extra", is_flag=True,
              help="With --full: delete the documents the index holds and the batch does not (needs allow_delete; "
                   "refused above max_delete_fraction of the batch unless --force).")
@click.option("--force", is_flag=True, help="With --delete-extra: delete even above max_delete_fraction.")
def verify(config_file, as_json, url, index, state_dir, insecure, batch_id, embedding_version, expected_count,
           sources, id_field, batch_time, expected_date, full, enqueue_missing, repair, recompute, snapshot,
           delete_extra, force):
    """Check what arrived: count, sample checksums, timestamps; --full scans everything.

    Exits 0 when every check passes, 3 when one fails.

    Example:

        pushagent verify --batch-id words-3f2a9c1b0d --full --repair && pushagent drain --all
    """
    if (enqueue_missing or repair or recompute or delete_extra) and not full:
        raise click.UsageError("--enqueue-missing, --repair, --recompute and --delete-extra need --full")
    if force and not delete_extra:
        raise click.UsageError("--force only goes with --delete-extra")
    config = load_config(config_file, _flags(url=url, index=index, state_dir=state_dir, insecure=insecure,
                                             id_field=id_field, batch_time=batch_time))
    options = VerifyOptions(batch_id, embedding_version, config.index, expected_count, sources, expected_date, full,
                            enqueue_missing, recompute, snapshot, repair, delete_extra, force)
    with _interrupt_on_signals():
        report, exit_code = verify_batch(config, options)
    _print_report(report, as_json)
    sys.exit(exit_code)


@cli.group()
def state():
    """Read sync-state records and check the audit log."""


def state_options(command):
    """--config, --json, --debug and --state-dir: what every `state` command reads."""
    command = click.option("--state-dir", help="Where sync-state records and audit.jsonl are.")(command)
    return config_options(command)


def _state_path(config_file, state_dir):
    return load_config(config_file, _flags(state_dir=state_dir)).state_path


@state.command("list")
@state_options
def state_list(config_file, as_json, state_dir):
    """List the batches with a sync-state record.

    Example:

        pushagent state list --json
    """
    records = SyncStateStore(_state_path(config_file, state_dir)).list()
    rows = [{key: record.get(key) for key in ("batch_id", "status", "updated_at", "index", "embedding_version",
                                              "doc_count")} for record in records]
    if as_json:
        click.echo(json.dumps(rows, sort_keys=True))
        return
    click.echo(format_table(rows) if rows else f"no sync-state records in {_state_path(config_file, state_dir)}")


@state.command("show")
@click.argument("batch_id")
@state_options
def state_show(batch_id, config_file, as_json, state_dir):
    """Print the sync-state record of BATCH_ID (JSON).

    Example:

        pushagent state show words-3f2a9c1b0d
    """
    record = SyncStateStore(_state_path(config_file, state_dir)).load(batch_id)
    click.echo(json.dumps(record, sort_keys=True, indent=None if as_json else 1))


@state.command("audit")
@state_options
def state_audit(config_file, as_json, state_dir):
    """Check the hash chain of audit.jsonl and each sync-state record against it; exit 1 naming what is wrong.

    Example:

        pushagent state audit --json
    """
    path = _state_path(config_file, state_dir)
    log_file, result = AuditLog(path), audit_state(path)
    if as_json:
        click.echo(json.dumps(result.as_dict(), sort_keys=True))
    elif result.bad_line:
        click.echo(f"{log_file.path}:{result.bad_line}: {result.problem}", err=True)
    else:
        click.echo(f"{log_file.path}: {result.lines} entries, chain intact"
                   + (f" ({result.problem})" if result.ok and result.problem else "")
                   + f"; {result.records} sync-state records checked", err=True)
        for problem in result.record_problems:
            click.echo(problem, err=True)
    sys.exit(EXIT_OK if result.ok else EXIT_FAILURE)


def main():
    return_large_buffers_to_os()
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(EXIT_USAGE)
