"""`pushagent status`: last run, queue depth, sync lag and a healthy/warning/critical verdict.

Everything is read from the state dir, defensively: a checkpoint or
sync-state record that is missing, half-written or of a newer shape is
skipped, never fatal, because a health check that crashes alerts nobody.
Nothing is locked or created, so `status` cannot disturb a running push.
"""

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from pushagent.documents.chunker import Position
from pushagent.errors import PushAgentError
from pushagent.inputs.shard import file_ranges, parse_shard
from pushagent.inputs.source import InputFile
from pushagent.ops.progress import bytes_done, bytes_total, input_sizes
from pushagent.state.records import utc_iso
from pushagent.state.retry_queue import open_queue
from pushagent.state.retry_queue.base import DEAD, PENDING

HEALTHY, WARNING, CRITICAL = "healthy", "warning", "critical"
EXIT_CODES = {HEALTHY: 0, WARNING: 1, CRITICAL: 2}
SUCCESS_STATUSES = ("pushed", "verified")
# Without a `due` count from the queue, pending items are read to count it; not past this many.
QUEUE_SCAN_LIMIT = 10_000
TIME_KEYS = ("verified_at", "finished_at", "completed_at", "updated_at", "ended_at")


def read_records(directory: Path) -> list[dict]:
    """Every readable JSON object in `directory/*.json`, with its path; others are skipped."""
    records = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            data["_path"] = str(path)
            data["_mtime"] = path.stat().st_mtime
            records.append(data)
    return records


def parse_time(value) -> float | None:
    """Epoch seconds from an ISO 8601 string or a number; None when neither."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def record_time(record: dict, keys=TIME_KEYS) -> float | None:
    """The first time found under `keys`, at the top level or in a `timestamps` mapping; else the file's mtime."""
    nested = record.get("timestamps") if isinstance(record.get("timestamps"), dict) else {}
    for key in keys:
        for source in (record, nested):
            found = parse_time(source.get(key)) or parse_time(source.get(key.removesuffix("_at")))
            if found:
                return found
    return record.get("_mtime")


def last_run(state_dir: Path) -> dict | None:
    """The checkpoint updated last, or None when no batch was ever pushed."""
    runs = read_records(state_dir / "runs")
    run = max(runs, key=lambda r: record_time(r, ("updated_at",)) or 0, default=None)
    return _with_later_verification(run, state_dir) if run else None


def _with_later_verification(run: dict, state_dir: Path) -> dict:
    """A `verify` after the push writes only the batch's sync-state record, not the checkpoint: when the
    record is newer than a finished run, its status is the batch's latest word."""
    if run.get("status") not in SUCCESS_STATUSES:
        return run
    record = next((r for r in read_records(state_dir / "sync-state") if r.get("batch_id") == run.get("batch_id")),
                  None)
    if record and (record_time(record, ("updated_at",)) or 0) > (record_time(run, ("updated_at",)) or 0):
        return {**run, "status": record.get("status", run["status"]), "checkpoint_status": run["status"]}
    return run


def last_success(state_dir: Path, statuses=SUCCESS_STATUSES) -> tuple[float, str] | None:
    """(time, batch_id) of the newest batch whose status is in `statuses`, from sync-state and checkpoints."""
    candidates = [(record_time(r), r.get("batch_id", "")) for r in _all_records(state_dir)
                  if r.get("status") in statuses]
    candidates = [c for c in candidates if c[0]]
    return max(candidates, default=None)


def _all_records(state_dir: Path) -> list[dict]:
    return read_records(state_dir / "sync-state") + read_records(state_dir / "runs")


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


def run_summary(run: dict, now: float) -> dict:
    """What `status` says about one checkpoint."""
    counters = run.get("counters") if isinstance(run.get("counters"), dict) else {}
    summary = {"batch_id": run.get("batch_id"), "status": run.get("status"), "started_at": run.get("started_at"),
               "updated_at": run.get("updated_at"), "running": _is_running(run),
               "processed": counters.get("read", 0), "counters": counters,
               "errors": {k: counters.get(k, 0) for k in ("queued", "dead", "quarantined")},
               "error": run.get("error")}
    summary.update(_input_progress(run))
    updated = record_time(run, ("updated_at",))
    summary["age_s"] = round(now - updated) if updated else None
    return summary


def _input_progress(run: dict) -> dict:
    """Bytes done and total, and where a resume starts; empty when the checkpoint lacks them."""
    try:
        inputs = run["inputs"]
        position = Position(**run["position"])
        sizes = input_sizes(inputs)
        shard = parse_shard(run["shard"]) if run.get("shard") else None
        ranges = file_ranges([InputFile(**fp) for fp in inputs], shard) if shard else None
    except (KeyError, TypeError, PushAgentError):
        return {}
    done, total = bytes_done(sizes, position, ranges), bytes_total(sizes, ranges)
    resume = None
    if position.file_index < len(inputs) and run.get("checkpoint_status", run.get("status")) not in SUCCESS_STATUSES:
        resume = {"file": inputs[position.file_index].get("path"), "line": position.line, "offset": position.offset}
    return {"bytes_done": done, "bytes_total": total,
            "percent": round(100.0 * done / total, 1) if total else 100.0, "next_resume": resume}


def _is_running(run: dict) -> bool:
    """A `pushing` checkpoint whose lock file names a live process on this host.

    The pid is read, not the lock taken: even a shared flock held for an
    instant could make a push starting then refuse to run.
    """
    if run.get("status") != "pushing" or "_path" not in run:
        return False
    try:
        pid = int(Path(run["_path"]).with_suffix(".lock").read_text().strip())
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
        return [(WARNING, f"last run of {run['batch_id']} failed: {run.get('error') or 'see its log'}")]
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
    for record in read_records(state_dir / "sync-state"):
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
            for record in read_records(state_dir / "sync-state")
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
              "last_run": run_summary(run, now) if run else None,
              "last_synced": {"batch_id": verified[1], "at": utc_iso(verified[0]), "basis": basis} if verified else None,
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
