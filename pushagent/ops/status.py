"""`pushagent status`: last run, queue depth, sync lag and a healthy/warning/critical verdict.

Everything is read from the state dir, defensively: a checkpoint or
sync-state record that is missing, half-written or of a newer shape is
skipped, never fatal, because a health check that crashes alerts nobody.
Nothing is locked or created, so `status` cannot disturb a running push.
"""

import os
import time
from pathlib import Path

from pushagent.documents.builder import ms_from_iso
from pushagent.errors import PushAgentError
from pushagent.inputs.shard import file_ranges, parse_shard
from pushagent.inputs.source import InputFile
from pushagent.ops.progress import bytes_done, bytes_total, input_sizes
from pushagent.state.checkpoint import BatchLock, CheckpointStore, RunState
from pushagent.state.records import SyncStateStore, synced_at, utc_iso
from pushagent.state.retry_queue import open_queue
from pushagent.state.retry_queue.base import DEAD, PENDING

HEALTHY, WARNING, CRITICAL = "healthy", "warning", "critical"
EXIT_CODES = {HEALTHY: 0, WARNING: 1, CRITICAL: 2}
SUCCESS_STATUSES = ("pushed", "verified")
# Without a `due` count from the queue, pending items are read to count it; not past this many.
QUEUE_SCAN_LIMIT = 10_000


def parse_time(text: str) -> float | None:
    """Epoch seconds of a time stamp of a run state or record (ISO 8601); None when it holds none."""
    try:
        return ms_from_iso(text) / 1000
    except ValueError:
        return None


def last_run(state_dir: Path) -> RunState | None:
    """The run state updated last, or None when no batch was ever pushed."""
    return max(CheckpointStore(state_dir).states(), key=lambda state: parse_time(state.updated_at) or 0,
               default=None)


def latest_status(state: RunState, state_dir: Path) -> str:
    """A `verify` after the push writes only the batch's sync-state record, not the checkpoint: when the
    record is newer than a finished run, its status is the batch's latest word."""
    if state.status not in SUCCESS_STATUSES:
        return state.status
    record = next((r for r in SyncStateStore(state_dir).records() if r["batch_id"] == state.batch_id), None)
    if record and (parse_time(record.get("updated_at")) or 0) > (parse_time(state.updated_at) or 0):
        return record.get("status", state.status)
    return state.status


def last_success(state_dir: Path, statuses=SUCCESS_STATUSES) -> tuple[float, str] | None:
    """(time, batch_id) of the newest batch whose status is in `statuses`, from sync-state and checkpoints."""
    records = [(parse_time(synced_at(r)), r["batch_id"]) for r in SyncStateStore(state_dir).records()
               if r.get("status") in statuses]
    runs = [(parse_time(state.updated_at), state.batch_id) for state in CheckpointStore(state_dir).states()
            if state.status in statuses]
    return max((found for found in records + runs if found[0]), default=None)


def queue_depth(config) -> dict:
    """Retry-queue items {'due', 'later', 'dead'}; a count is None when it cannot be known."""
    url = config.resolved_queue_url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite://"):]).exists():
        return {"due": 0, "later": 0, "dead": 0}
    queue = open_queue(url, config.max_attempts, config.max_retry_delay)
    try:
        stats = queue.stats()
        pending, due = stats.get(PENDING, 0), stats.get("due")
        if due is None and pending <= QUEUE_SCAN_LIMIT:
            now = time.time()
            due = sum(1 for item in queue.list(PENDING, limit=pending) if item.next_attempt_at <= now)
    finally:
        queue.close()
    return {"due": due, "later": None if due is None else pending - due, "dead": stats.get(DEAD, 0),
            "pending": pending}


def run_summary(state: RunState, state_dir: Path, now: float) -> dict:
    """What `status` says about one run state."""
    counters = state.counters
    summary = {"batch_id": state.batch_id, "status": latest_status(state, state_dir),
               "started_at": state.started_at, "updated_at": state.updated_at,
               "running": _is_running(state, state_dir), "processed": counters.read, "counters": counters.as_dict(),
               "errors": {name: getattr(counters, name) for name in ("queued", "dead", "quarantined")}}
    if summary["status"] != state.status:
        summary["checkpoint_status"] = state.status
    summary.update(_input_progress(state))
    updated = parse_time(state.updated_at)
    summary["age_s"] = round(now - updated) if updated else None
    return summary


def _input_progress(state: RunState) -> dict:
    """Bytes done and total, and where a resume starts; empty when the inputs' sizes are unknown."""
    try:
        sizes = input_sizes(state.inputs)
        shard = parse_shard(state.shard) if state.shard else None
        ranges = file_ranges([InputFile(**fp) for fp in state.inputs], shard) if shard else None
    except (KeyError, TypeError, PushAgentError):
        return {}
    position = state.position
    done, total = bytes_done(sizes, position, ranges), bytes_total(sizes, ranges)
    resume = None
    if position.file_index < len(state.inputs) and state.status not in SUCCESS_STATUSES:
        resume = {"file": state.inputs[position.file_index].get("path"), "line": position.line,
                  "offset": position.offset}
    return {"bytes_done": done, "bytes_total": total,
            "percent": round(100.0 * done / total, 1) if total else 100.0, "next_resume": resume}


def _is_running(state: RunState, state_dir: Path) -> bool:
    """A `pushing` run whose lock file names a live process on this host.

    The pid is read, not the lock taken: even a shared flock held for an
    instant could make a push starting then refuse to run.
    """
    if state.status != "pushing":
        return False
    try:
        pid = int(BatchLock(state_dir, state.key).path.read_text().strip())
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (OSError, ValueError):
        return False
    return True


def verdict(report: dict, config) -> tuple[str, list]:
    """The worst level among the checks, and one reason per check that is not healthy."""
    state_dir = Path(report["state_dir"])
    reasons = (_lag_reasons(report, config) + _dead_reasons(report, config) + _run_reasons(report)
               + _incomplete_reasons(state_dir) + _extra_reasons(state_dir, config))
    level = max((level for level, _ in reasons), key=list(EXIT_CODES).index, default=HEALTHY)
    return level, [{"level": level, "message": message} for level, message in reasons]


def _lag_reasons(report: dict, config) -> list:
    lag = report["sync_lag_s"]
    if lag is None:
        return [(WARNING, "no batch has been verified or pushed yet")]
    for limit, level in ((config.health_lag_critical, CRITICAL), (config.health_lag_warning, WARNING)):
        if lag > limit:
            return [(level, f"sync lag {_hours(lag)} is over {_hours(limit)}")]
    return []


def _dead_reasons(report: dict, config) -> list:
    dead = report["queue"].get("dead") or 0
    for limit, level in ((config.health_dead_critical, CRITICAL), (config.health_dead_warning, WARNING)):
        if dead > limit:
            return [(level, f"{dead} dead-lettered items (more than {limit}): see `pushagent queue list`")]
    return []


def _run_reasons(report: dict) -> list:
    run = report["last_run"]
    if report.get("queue_error"):
        return [(WARNING, f"retry queue unreadable: {report['queue_error']}")]
    if run is None:
        return []
    if run["status"] == "failed":
        return [(WARNING, f"last run of {run['batch_id']} failed: see its log")]
    if run["status"] == "verification_failed":
        return [(WARNING, f"verification of {run['batch_id']} failed: see `pushagent state show {run['batch_id']}`")]
    if run["status"] == "pushing" and not run["running"]:
        return [(WARNING, f"last run of {run['batch_id']} stopped without finishing: run the same command again")]
    return []


def extra_documents(state_dir: Path, fraction: float) -> list:
    """(batch_id, extra, over the threshold) for each snapshot batch whose last `verify --full` found documents
    in the index that the batch does not hold: what `--delete-extra` would delete. (In an index many batches
    feed, a batch that is not a snapshot always has other batches' documents beside it.)"""
    found = []
    for record in SyncStateStore(state_dir).records():
        extra = ((record.get("verification") or {}).get("full") or {}).get("extra")
        if record.get("snapshot") and extra:
            found.append((record["batch_id"], extra, extra > fraction * max(record.get("doc_count") or 0, 1)))
    return found


def _extra_reasons(state_dir: Path, config) -> list:
    return [(WARNING, f"batch {batch_id}: the index holds {extra} documents this snapshot does not, more than "
             f"max_delete_fraction ({config.max_delete_fraction:.0%}) of it: a shrinking snapshot? "
             "`pushagent verify --full` lists them")
            for batch_id, extra, over in extra_documents(state_dir, config.max_delete_fraction) if over]


def _incomplete_reasons(state_dir: Path) -> list:
    """Batches pushed in shards of which some have not finished: half a batch is not a synced one."""
    return [(WARNING, f"batch {record['batch_id']} is incomplete: shards {', '.join(record['waiting_for_shards'])} "
             "have not finished; push them (same inputs, --batch-id and --shard)")
            for record in SyncStateStore(state_dir).records()
            if record.get("status") == "incomplete" and record.get("waiting_for_shards")]


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def health_report(config, now: float | None = None) -> dict:
    """The whole `status` report; `health` is healthy, warning or critical (see EXIT_CODES)."""
    now = time.time() if now is None else now
    state_dir = config.state_path
    run = last_run(state_dir)
    verified = last_success(state_dir, ("verified",))
    basis = "verified"
    if verified is None:  # verification may be off (--no-verify): the last complete push is what we have
        verified, basis = last_success(state_dir, ("pushed",)), "pushed"
    report = {"checked_at": utc_iso(now), "state_dir": str(state_dir),
              "last_run": run_summary(run, state_dir, now) if run else None,
              "last_synced": ({"batch_id": verified[1], "at": utc_iso(verified[0]), "basis": basis}
                              if verified else None),
              "sync_lag_s": round(now - verified[0]) if verified else None}
    try:
        report["queue"] = queue_depth(config)
    except Exception as error:  # any backend failure is a finding, not a crash
        report["queue"], report["queue_error"] = {"due": None, "later": None, "dead": None}, str(error)
    report["health"], report["reasons"] = verdict(report, config)
    report["thresholds"] = {"lag_warning_s": config.health_lag_warning, "lag_critical_s": config.health_lag_critical,
                            "dead_warning": config.health_dead_warning, "dead_critical": config.health_dead_critical}
    return report


def _resume_text(resume: dict) -> str:
    if not resume["line"]:
        return f"the same command resumes at the start of {resume['file']}"
    return f"the same command resumes after line {resume['line']:,} of {resume['file']}"


def format_status(report: dict) -> str:
    """The report for people, first line in the monitoring-plugin style."""
    lines = [f"pushagent {report['health'].upper()}"]
    lines += [f"  {reason['level']}: {reason['message']}" for reason in report["reasons"]]
    run = report["last_run"]
    if run:
        status = str(run['status']).replace("_", " ")
        lines.append(f"  last run: {run['batch_id']} {status}{' (running)' if run['running'] else ''},"
                     f" {run['processed']:,} records, {run.get('percent', '?')}% of input, updated {run['updated_at']}")
        if run.get("next_resume"):
            lines.append("  " + _resume_text(run["next_resume"]))
    synced = report["last_synced"]
    if synced:
        lines.append(f"  last {synced['basis']}: {synced['batch_id']} at {synced['at']},"
                     f" lag {_hours(report['sync_lag_s'])}")
    queue = report["queue"]
    due, later, dead = ("?" if queue.get(k) is None else queue[k] for k in ("due", "later", "dead"))
    lines.append(f"  queue: {due} due, {later} later, {dead} dead")
    return "\n".join(lines)
