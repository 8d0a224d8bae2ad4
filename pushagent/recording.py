"""What a push records for verification and sync-state, and the `verify` command's run.

A push calls BatchRecorder at its start (record `pushing`), for each
resolved chunk (the documents the index should hold, and the sample), and at
its end (record `pushed`/`interrupted`/..., then verification). `verify_batch`
checks a batch again later, from its record (merging the tables of a sharded
batch) or from the source files.
"""

import dataclasses
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from .builder import BuildSettings
from .cluster import ClusterClient
from .doctable import DocTable, table_path
from .errors import EXIT_INCOMPLETE, EXIT_OK, ConfigError
from .extra import DeleteRefused, delete_extra
from .fullscan import enqueue
from .mirror import mirror_state
from .retry_queue import configured_queue
from .shard import Shard, run_key
from .sharded import batch_fields, batch_progress, check_finished, merged_table, shard_states
from .state import AuditLog, SyncStateStore, runtime_fields
from .verifier import VerifySpec, add_full_scan, load_sources, run_checks, summarize, temporary_table

log = logging.getLogger(__name__)
REFUSED = "delete_refused"


def spec_for(settings: BuildSettings, state_path, expected_date=None, snapshot: bool = False) -> VerifySpec:
    """Documents last updated before the batch time are stale: the batch's own (a re-stamp missed), or, for a
    snapshot, any of its embedding version. Without a batch stamp or an embedding version the index may hold
    other batches, so only an explicit date is checked."""
    scoped = settings.batch_id is not None or settings.embedding_version is not None
    default_date = settings.batch_time_iso if scoped else None
    return VerifySpec(settings.embedding_version, expected_date or default_date,
                      settings.embedding_version_field, settings.timestamp_field, settings.checksum_field,
                      batch_id=settings.batch_id, batch_field=settings.batch_field, snapshot=snapshot,
                      runs_dir=Path(state_path) / "runs")


def settings_from_record(record: dict) -> BuildSettings:
    values = dict(record["build"])
    values["allowed_indices"] = frozenset(values["allowed_indices"])
    return BuildSettings(**values)


class BatchRecorder:
    """Sync-state and documents of one push run (of a whole batch, or of one `shard` of it)."""

    def __init__(self, config, batch_id: str, settings: BuildSettings, files, checkpoints, verify: bool = True,
                 shard: Shard | None = None):
        self.config, self.batch_id, self.settings, self.files = config, batch_id, settings, files
        self.checkpoints, self.verify, self.shard = checkpoints, verify, shard
        # A shard has a table of its own: each has one writer, on whatever node its task runs.
        self.table = DocTable(table_path(config.state_path, run_key(batch_id, shard)), config.sample_size, batch_id)
        self.client = ClusterClient(config)
        self.cluster = {}

    def started(self, state) -> None:
        if state.counters["read"] == 0:
            self.table.reset()
        self.cluster = self.client.info()
        self.write(state, "pushing")

    def resolved(self, outcome) -> None:
        """Documents the index should hold: acknowledged ones (2xx replaces an equal version, 409 does not),
        and queued ones, which `drain` delivers later; dead-lettered ones are not expected."""
        self.table.add(outcome.indexed, replace_equal=True)
        self.table.add(outcome.current + outcome.unchanged + [doc for doc, _ in outcome.retry], replace_equal=False)

    def finished(self, state, result):
        """Write the final record; verify first when the batch was pushed completely and can be verified now."""
        if result.status == "pushed" and not state.counters["read"]:
            log.warning("the inputs hold no records: nothing was sent, there is nothing to verify")
        elif result.status == "pushed" and self.verify and self._ready_to_verify(state):
            self.write(state, "pushed")
            spec = spec_for(self.settings, self.config.state_path, snapshot=self.config.snapshot)
            result.verification = run_checks(self.client, self.table, spec, self.indices(), self.table.sample())
            result.status = "verified" if result.verification["ok"] else "verification_failed"
            if not result.verification["ok"] and result.exit_code == EXIT_OK:
                result.exit_code = EXIT_INCOMPLETE
            state.status = result.status
            self.checkpoints.save(state)
        self.write(state, result.status, getattr(result, "verification", None))
        return result

    def _ready_to_verify(self, state) -> bool:
        """Not while other shards may still push, nor while records wait in the retry queue: the index
        cannot hold the whole batch yet, so verifying could only fail. Says when to verify instead."""
        waiting_for = self._waiting_for(state)
        if waiting_for:
            log.info("batch %s can be verified after %s: `pushagent verify --batch-id %s`", self.batch_id,
                     waiting_for, self.batch_id)
        return not waiting_for

    def _waiting_for(self, state) -> str:
        if self.shard:
            return f"its other shards have finished (this is shard {self.shard})"
        if state.counters["queued"]:
            return f"`pushagent drain` has sent the {state.counters['queued']} records waiting in the retry queue"
        return ""

    def indices(self) -> list:
        return self.table.indices() or [self.settings.default_index]

    def write(self, state, status: str, verification=None) -> None:
        save_record(self.config.state_path, batch_record(self, state, status, verification))

    def close(self) -> None:
        self.table.close()
        self.client.close()


def save_record(state_path, record: dict) -> None:
    """The batch's latest record replaces the one before; the audit log keeps every one."""
    SyncStateStore(state_path).save(record)
    AuditLog(state_path).append(record)


def batch_record(recorder: BatchRecorder, state, status: str, verification) -> dict:
    """Every field SPEC section 6 lists, plus what `verify --batch-id` needs to run again."""
    counts, settings = recorder.table.counts(), recorder.settings
    build = dataclasses.asdict(settings)
    build["allowed_indices"] = sorted(settings.allowed_indices)
    now = _now_iso()
    shard = {}
    if recorder.shard:
        shard = {"shard": str(recorder.shard),
                 **batch_progress(recorder.config.state_path, recorder.batch_id, recorder.shard, state)}
        if shard["waiting_for_shards"]:
            shard["doc_count"] = None   # the batch's documents are counted once its shards are merged
            status = "incomplete" if status == "pushed" else status
    return {"batch_id": recorder.batch_id, "status": status, "started_at": state.started_at,
            "updated_at": now, "finished_at": None if status == "pushing" else now,
            "batch_time": settings.batch_time_iso, "embedding_version": settings.embedding_version,
            "index": settings.default_index,
            "indices": recorder.indices(), "inputs": [f.path for f in recorder.files],
            "doc_count": counts["distinct"], "deleted": counts["deleted"], "duplicates": counts["duplicates"],
            "snapshot": recorder.config.snapshot,
            "checksum": recorder.table.checksum(), "counters": dict(state.counters),
            "verification": verification, "cluster": recorder.cluster, "build": build, **shard, **runtime_fields()}


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


def verify_batch(config, options: VerifyOptions) -> tuple:
    """Run `pushagent verify`; returns (report, exit code)."""
    started = time.monotonic()
    client = ClusterClient(config)
    try:
        if options.batch_id and not options.embedding_version:
            report = _verify_recorded(config, client, options)
        else:
            report = _verify_unrecorded(config, client, options)
    finally:
        client.close()
    report["duration_s"] = round(time.monotonic() - started, 3)
    return report, EXIT_OK if report["verification"]["ok"] else EXIT_INCOMPLETE


def _verify_recorded(config, client, options: VerifyOptions) -> dict:
    record = SyncStateStore(config.state_path).load(options.batch_id)
    settings = settings_from_record(record)
    table = _batch_table(config, record)
    log.info("verifying batch %s: count, sample and timestamp checks", record["batch_id"])
    try:
        spec = spec_for(settings, config.state_path, options.expected_date, record.get("snapshot") or options.snapshot)
        result = run_checks(client, table, spec, record["indices"], table.sample())
        _note_queued(config, record["batch_id"], result)
    finally:
        table.close()
    added = _full_from_inputs(config, client, options, result, settings, record) if options.full else {}
    record["snapshot"] = bool(record.get("snapshot") or options.snapshot)
    record.update(status="verified" if result["ok"] else "verification_failed", verification=result,
                  updated_at=_now_iso(), **runtime_fields())
    save_record(config.state_path, record)
    if REFUSED in added:
        raise added[REFUSED]
    report = _report(record["batch_id"], result, added, record.get("counters", {}))
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


def _full_from_inputs(config, client, options: VerifyOptions, result: dict, settings, record: dict) -> dict:
    """--full for a recorded batch: the source is its inputs, read again."""
    directory, source = temporary_table(config.sample_size, "")
    try:
        log.info("scanning batch %s: every document of %s against its inputs, read again", record["batch_id"],
                 ", ".join(record["indices"]))
        load_sources(record["inputs"], settings, source, config.s3_endpoint_url)
        source.executemany("DELETE FROM docs WHERE idx = ? AND id = ?", _dead_documents(config, record["batch_id"]))
        return _full(config, client, options, result, settings, source, record["indices"], record.get("snapshot"))
    finally:
        source.close()
        directory.cleanup()


def _verify_unrecorded(config, client, options: VerifyOptions) -> dict:
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
                          None if options.sources else options.expected_count)
        result = run_checks(client, table, spec, [options.index], table.sample())
        added = _full(config, client, options, result, settings, table, [options.index])
    finally:
        table.close()
        directory.cleanup()
    if REFUSED in added:
        raise added[REFUSED]
    return _report(options.batch_id or f"verify-{options.embedding_version}", result, added, {})


def _settings_for_sources(config, options: VerifyOptions) -> BuildSettings:
    from .push import batch_generation_ms, build_settings  # push imports this module
    from .reader import expand_inputs
    config = dataclasses.replace(config, index=options.index, embedding_version=options.embedding_version)
    batch_ms = batch_generation_ms(config, expand_inputs(options.sources)) if options.sources else 0
    return build_settings(config, batch_ms)


def _full(config, client, options: VerifyOptions, result: dict, settings, table, indices, snapshot=False) -> dict:
    """--full: diff the whole index against the sources loaded in `table`; then queue what is missing
    (--enqueue-missing, --repair) or delete what is extra (--delete-extra). Returns what the report adds."""
    if not options.full:
        return {}
    spec = spec_for(settings, config.state_path, snapshot=snapshot or options.snapshot)
    add_full_scan(client, result, table, indices, spec, options.recompute)
    batch_id = options.batch_id or f"verify-{settings.embedding_version}"
    added = {"enqueued": _enqueue(config, options, result, settings, table, batch_id)}
    if options.delete_extra and "error" not in result["full"]:
        try:
            added["deleted_extra"] = delete_extra(config, table, settings, settings.batch_id or batch_id,
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


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
