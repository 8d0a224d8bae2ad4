"""`pushagent verify`: check a batch against the index, from its sync-state record or from its inputs.

Counts by batch, sample checksums, timestamps and, with `--full`, a scan of
every document; `--enqueue-missing`/`--repair` queue what is missing or
changed, `--delete-extra` removes what a snapshot batch no longer holds.
"""

import dataclasses
import logging
import time

from pushagent.cluster.connection import HttpCluster
from pushagent.documents.builder import BuildSettings
from pushagent.errors import EXIT_INCOMPLETE, EXIT_OK, ConfigError
from pushagent.runs.checks import VerifySpec, add_full_scan, load_sources, run_checks, summarize, temporary_table
from pushagent.runs.extra import DeleteRefused, delete_extra
from pushagent.runs.fullscan import enqueue
from pushagent.runs.record import save_record, settings_from_record, spec_for
from pushagent.runs.sharded import batch_fields, check_finished, merged_table, shard_states
from pushagent.state.doctable import DocTable, table_path
from pushagent.state.ledger import Ledger
from pushagent.state.mirror import mirror_state
from pushagent.state.records import SyncStateStore, runtime_fields, utc_iso
from pushagent.state.retry_queue import configured_queue

log = logging.getLogger(__name__)

REFUSED = "delete_refused"


@dataclasses.dataclass
class VerifyOptions:
    batch_id: str | None = None
    embedding_version: str | None = None
    index: str | None = None
    expected_count: int | None = None
    sources: tuple = ()
    expected_date: str | None = None
    full: bool = False
    enqueue_missing: bool = False
    recompute: bool = False
    snapshot: bool = False
    repair: bool = False
    delete_extra: bool = False
    force: bool = False


def verify_batch(config, options: VerifyOptions, cluster=None) -> tuple:
    """Run `pushagent verify` against `cluster` (default: HTTP to config.url); returns (report, exit code)."""
    started = time.monotonic()
    cluster = cluster or HttpCluster(config)
    if options.batch_id and not options.embedding_version:
        report = _verify_recorded(config, cluster, options)
    else:
        report = _verify_unrecorded(config, cluster, options)
    report["duration_s"] = round(time.monotonic() - started, 3)
    return report, EXIT_OK if report["verification"]["ok"] else EXIT_INCOMPLETE


def _verify_recorded(config, cluster, options: VerifyOptions) -> dict:
    record = SyncStateStore(config.state_path).load(options.batch_id)
    settings = settings_from_record(record)
    table = _batch_table(config, record)
    log.info("verifying batch %s: count, sample and timestamp checks", record["batch_id"])
    try:
        spec = spec_for(settings, config, options.expected_date, record.get("snapshot") or options.snapshot)
        with cluster.client() as client:
            result = run_checks(client, table, spec, record["indices"], table.sample())
        _note_queued(config, record["batch_id"], result)
    finally:
        table.close()
    added = _full_from_inputs(config, cluster, options, result, settings, record) if options.full else {}
    record["snapshot"] = bool(record.get("snapshot") or options.snapshot)
    record.update(status="verified" if result["ok"] else "verification_failed", verification=result,
                  updated_at=utc_iso(), **runtime_fields())
    save_record(config.state_path, record)
    if REFUSED in added:
        raise added[REFUSED]
    report = _report(record["batch_id"], result, added, Ledger.from_dict(record.get("counters", {})).as_dict())
    mirrored = mirror_state(config, record["batch_id"])  # a sharded batch's record is final only here
    if mirrored is not None:
        report["mirror"] = mirrored
    return report


def _note_queued(config, batch_id: str, result: dict) -> None:
    """When documents are missing, say how many of the batch's records still wait in the retry queue."""
    count = result.get("count", {})
    if not count.get("missing"):
        return
    with configured_queue(config) as retry_queue:
        waiting = retry_queue.stats()["batches"].get(batch_id, {}).get("pending", 0)
    if waiting:
        count["waiting_in_queue"] = waiting
        summarize(result)


def _dead_documents(config, batch_id: str) -> list:
    """(index, id) of the batch's dead-lettered documents: the cluster refused them, so the index is not
    expected to hold them (the push's own table leaves them out too)."""
    with configured_queue(config) as retry_queue:
        dead = retry_queue.stats()["batches"].get(batch_id, {}).get("dead", 0)
        items = retry_queue.list("dead", dead, batch_id) if dead else []
    return [(item.index, item.doc_id) for item in items if item.doc_id is not None]


def _batch_table(config, record: dict) -> DocTable:
    """The documents the batch's index should hold. A sharded batch's come from all its shards, once they
    have finished; `record`, the one its last shard wrote, then gets the batch's totals and shards."""
    batch_id = record["batch_id"]
    states = shard_states(config.state_path, batch_id)
    if not states:
        return DocTable(table_path(config.state_path, batch_id), config.sample_size, batch_id)
    check_finished(batch_id, states)
    table = merged_table(config.state_path, batch_id, states, config.sample_size)
    record.pop("shard", None)
    record.pop("waiting_for_shards", None)
    record.update(batch_fields(table, states, record["indices"]))
    return table


def _full_from_inputs(config, cluster, options: VerifyOptions, result: dict, settings, record: dict) -> dict:
    """--full for a recorded batch: the source is its inputs, read again."""
    directory, source = temporary_table(config.sample_size, "")
    try:
        log.info("scanning batch %s: every document of %s against its inputs, read again", record["batch_id"],
                 ", ".join(record["indices"]))
        load_sources(record["inputs"], settings, source, config.s3_endpoint_url)
        source.executemany("DELETE FROM docs WHERE idx = ? AND id = ?", _dead_documents(config, record["batch_id"]))
        return _full(config, cluster, options, result, settings, source, record["indices"], record.get("snapshot"))
    finally:
        source.close()
        directory.cleanup()


def _verify_unrecorded(config, cluster, options: VerifyOptions) -> dict:
    if not (options.embedding_version and options.index) or not (options.sources or options.expected_count is not None):
        raise ConfigError("verify needs --batch-id, or --embedding-version and --index with --source FILE... "
                          "or --expected-count N")
    if options.full and not options.sources:
        raise ConfigError("--full needs the source files: give --source FILE... or --batch-id of a recorded batch")
    settings = _settings_for_sources(config, options)
    directory, table = temporary_table(config.sample_size, options.embedding_version)
    try:
        load_sources(options.sources, settings, table)
        expected_date = options.expected_date or (settings.batch_time_iso if options.sources else None)
        spec = VerifySpec(options.embedding_version, expected_date, settings.embedding_version_field,
                          settings.timestamp_field, settings.checksum_field,
                          None if options.sources else options.expected_count,
                          settle_seconds=config.count_settle_seconds)
        with cluster.client() as client:
            result = run_checks(client, table, spec, [options.index], table.sample())
        added = _full(config, cluster, options, result, settings, table, [options.index])
    finally:
        table.close()
        directory.cleanup()
    if REFUSED in added:
        raise added[REFUSED]
    return _report(options.batch_id or f"verify-{options.embedding_version}", result, added, {})


def _settings_for_sources(config, options: VerifyOptions) -> BuildSettings:
    from pushagent.inputs.reader import expand_inputs
    from pushagent.runs.settings import batch_generation_ms, build_settings  # push imports this module
    config = dataclasses.replace(config, index=options.index, embedding_version=options.embedding_version)
    batch_ms = batch_generation_ms(config, expand_inputs(options.sources)) if options.sources else 0
    return build_settings(config, batch_ms)


def _full(config, cluster, options: VerifyOptions, result: dict, settings, table, indices, snapshot=False) -> dict:
    """--full: diff the whole index against the sources loaded in `table`; then queue what is missing
    (--enqueue-missing, --repair) or delete what is extra (--delete-extra). Returns what the report adds."""
    if not options.full:
        return {}
    spec = spec_for(settings, config, snapshot=snapshot or options.snapshot)
    with cluster.client() as client:
        add_full_scan(client, result, table, indices, spec, options.recompute)
    batch_id = options.batch_id or f"verify-{settings.embedding_version}"
    added = {"enqueued": _enqueue(config, options, result, settings, table, batch_id)}
    if options.delete_extra and "error" not in result["full"]:
        try:
            added["deleted_extra"] = delete_extra(config, cluster, table, settings, settings.batch_id or batch_id,
                                                  spec.snapshot, options.force)
        except DeleteRefused as refusal:
            added[REFUSED] = refusal    # raised once the scan's findings are recorded
    return {key: value for key, value in added.items() if value is not None}


def _enqueue(config, options: VerifyOptions, result: dict, settings, table, batch_id: str) -> int | None:
    queueing = options.enqueue_missing or options.repair
    if not queueing or not (result["full"].get("missing") or options.repair and result["full"].get("mismatched")):
        return 0 if queueing else None
    with configured_queue(config) as retry_queue:
        return enqueue(table, settings, retry_queue, batch_id, options.repair, config.s3_endpoint_url)


def _report(batch_id: str, result: dict, added: dict, counters: dict) -> dict:
    return {"batch_id": batch_id, "status": "verified" if result["ok"] else "verification_failed",
            **counters, "verification": result, **added}
