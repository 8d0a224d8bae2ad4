"""What a push records for verification and sync-state.

A push calls BatchRecorder at its start (record `pushing`), for each
resolved chunk (the documents the index should hold, and the sample), and at
its end (record `pushed`/`interrupted`/..., then verification). verify.py
checks a batch again later from the same record.
"""

import dataclasses
import logging
from pathlib import Path

from pushagent.documents.builder import BuildSettings
from pushagent.errors import EXIT_INCOMPLETE, EXIT_OK
from pushagent.inputs.shard import Shard, run_key
from pushagent.runs.checks import VerifySpec, run_checks
from pushagent.runs.sharded import batch_progress
from pushagent.state.doctable import DocTable, table_path
from pushagent.state.records import AuditLog, SyncStateStore, runtime_fields, utc_iso

log = logging.getLogger(__name__)


def spec_for(settings: BuildSettings, config, expected_date=None, snapshot: bool = False) -> VerifySpec:
    """Documents last updated before the batch time are stale: the batch's own (a re-stamp missed), or, for a
    snapshot, any of its embedding version. Without a batch stamp or an embedding version the index may hold
    other batches, so only an explicit date is checked."""
    scoped = settings.batch_id is not None or settings.embedding_version is not None
    default_date = settings.batch_time_iso if scoped else None
    return VerifySpec(settings.embedding_version, expected_date or default_date,
                      settings.embedding_version_field, settings.timestamp_field, settings.checksum_field,
                      batch_id=settings.batch_id, batch_field=settings.batch_field, snapshot=snapshot,
                      runs_dir=Path(config.state_path) / "runs", settle_seconds=config.count_settle_seconds)


def settings_from_record(record: dict) -> BuildSettings:
    values = dict(record["build"])
    values["allowed_indices"] = frozenset(values["allowed_indices"])
    return BuildSettings(**values)


class BatchRecorder:
    """Sync-state and documents of one push run (of a whole batch, or of one `shard` of it); verification reads
    `cluster`."""

    def __init__(self, config, cluster, batch_id: str, settings: BuildSettings, files, checkpoints, verify: bool = True,
                 shard: Shard | None = None):
        self.config, self.batch_id, self.settings, self.files = config, batch_id, settings, files
        self.checkpoints, self.verify, self.shard = checkpoints, verify, shard
        # A shard has a table of its own: each has one writer, on whatever node its task runs.
        self.table = DocTable(table_path(config.state_path, run_key(batch_id, shard)), config.sample_size, batch_id)
        self.client = cluster.client()
        self.cluster = {}

    def started(self, state) -> None:
        if state.counters.read == 0:
            self.table.reset()
        self.cluster = self.client.info()
        self.write(state, "pushing")

    def resolved(self, outcome) -> None:
        """Documents the index should hold: acknowledged ones (2xx replaces an equal version, 409 does not),
        and queued ones, which `drain` delivers later; dead-lettered ones are not expected."""
        self.table.add(outcome.indexed, outcome.current + outcome.unchanged + [doc for doc, _ in outcome.retry])

    def finished(self, state, result):
        """Write the final record; verify first when the batch was pushed completely and can be verified now."""
        if result.status == "pushed" and not state.counters.read:
            log.warning("the inputs hold no records: nothing was sent, there is nothing to verify")
        elif result.status == "pushed" and self.verify and self._ready_to_verify(state):
            self.write(state, "pushed")
            spec = spec_for(self.settings, self.config, snapshot=self.config.snapshot)
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
        if state.counters.queued:
            return f"`pushagent drain` has sent the {state.counters.queued} records waiting in the retry queue"
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
    now = utc_iso()
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
            "checksum": recorder.table.checksum(), "counters": state.counters.as_dict(),
            "verification": verification, "cluster": recorder.cluster, "build": build, **shard, **runtime_fields()}

