"""Sync-state records and the hash-chained audit log: two small, separate interfaces.

SyncStateStore keeps the latest record of each batch in
`<state_dir>/sync-state/<batch_id>.json` (replaced atomically). AuditLog
appends every record written to `<state_dir>/audit.jsonl`; each line carries
the sha256 of the line before it and of its own content, and
`<state_dir>/audit.head` holds the last line's hash, so an edited, removed,
reordered or truncated line is found by `check()`. `audit_state()` also
holds each sync-state record against its batch's last audit entry, so an
edited record is found too.
"""

import dataclasses
import fcntl
import getpass
import hashlib
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from pushagent import __version__
from pushagent.errors import PushAgentError
from pushagent.state.checkpoint import write_atomically
from pushagent.state.slurm_env import slurm_facts

STATUSES = ("pushing", "interrupted", "incomplete", "pushed", "verified", "verification_failed")
GENESIS = "0" * 64
TAIL_BYTES = 1 << 20      # an entry is a few KiB: the last line is within the file's last MiB
TORN_HEAD = "audit.head is one entry behind (an append was killed before moving it); the next append repairs it"
TORN_PARTIAL = "the last line is incomplete (an append was killed while writing it); the next append removes it"


def runtime_fields(environ=None) -> dict:
    """Agent version, host and Slurm job (ids, restart count, node) of the process writing a record."""
    return {"agent_version": __version__, "host": socket.gethostname(), "slurm": slurm_facts(environ)}


def utc_iso(epoch: float | None = None) -> str:
    """`epoch` (default: now) as the time stamp of records and reports: UTC, ISO 8601, to the second."""
    moment = datetime.now(timezone.utc) if epoch is None else datetime.fromtimestamp(epoch, timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def audit_event(state_dir, event: str, **facts) -> dict:
    """Append an entry for something done outside a batch's records (a purge, a deletion) to the audit log,
    with who did it, where and when; returns the entry."""
    entry = {"event": event, **facts, "user": getpass.getuser(), "host": socket.gethostname(),
             "at": utc_iso()}
    AuditLog(state_dir).append(entry)
    return entry


def synced_at(record: dict) -> str:
    """When the batch of `record` was last pushed: `finished_at` (a later `verify` leaves it as it was), or
    `updated_at` while it pushes."""
    return record.get("finished_at") or record.get("updated_at") or ""


class SyncStateStore:
    """`<state_dir>/sync-state/<batch_id>.json`: the latest record of each batch."""

    def __init__(self, state_dir):
        self.directory = Path(state_dir) / "sync-state"

    def path(self, batch_id: str) -> Path:
        return self.directory / f"{batch_id}.json"

    def save(self, record: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path(record["batch_id"]), json.dumps(record, indent=1, sort_keys=True).encode())

    def load(self, batch_id: str) -> dict:
        path = self.path(batch_id)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise PushAgentError(f"no sync-state record for batch {batch_id!r}", file=str(path),
                                 hint="`pushagent state list` shows the known batches") from None
        except ValueError as error:
            raise PushAgentError(f"sync-state record is unreadable: {error}", file=str(path)) from None

    def records(self):
        """Every readable record, in file name order; unreadable ones are skipped (for `status`, which must
        not fail on a half-written or foreign file)."""
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and "batch_id" in record:
                yield record

    def list(self) -> list:
        """Every record, oldest first."""
        if not self.directory.is_dir():
            return []
        records = [self.load(path.stem) for path in self.directory.glob("*.json")]
        return sorted(records, key=lambda r: (r.get("started_at") or "", r["batch_id"]))


@dataclasses.dataclass
class AuditResult:
    ok: bool
    lines: int
    bad_line: int | None = None
    problem: str = ""
    records: int = 0                                         # sync-state records checked against the log
    record_problems: list = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _line_hash(seq: int, previous: str, record: dict) -> str:
    canonical = json.dumps([seq, previous, record], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class AuditLog:
    """`<state_dir>/audit.jsonl`: {"seq", "prev_sha256", "sha256", "record"} per line."""

    def __init__(self, state_dir):
        self.path = Path(state_dir) / "audit.jsonl"
        self.head = Path(state_dir) / "audit.head"

    def append(self, record: dict) -> None:
        """Append under an exclusive lock, so concurrent array tasks keep one chain.

        First repairs what a process killed inside an earlier append left:
        a partial last line (never committed: cut off), or a whole last line
        whose move of audit.head was lost (committed: the head catches up).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            seq, previous = self._repaired_head(handle)
            entry = {"seq": seq + 1, "prev_sha256": previous, "record": record}
            entry["sha256"] = _line_hash(seq + 1, previous, record)
            handle.write(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
            write_atomically(self.head, json.dumps({"seq": seq + 1, "sha256": entry["sha256"]}).encode())

    def _repaired_head(self, handle) -> tuple:
        """(seq, sha256) to chain from, after repairing a torn earlier append (the lock is held)."""
        seq, previous = self._head()
        complete, partial = _tail(handle)
        if partial:
            handle.truncate(handle.tell() - len(partial))
            handle.seek(0, os.SEEK_END)
        try:
            last = json.loads(complete) if complete else None
        except ValueError:
            return seq, previous
        if _chains_from(last, seq, previous):
            seq, previous = last["seq"], last["sha256"]
            write_atomically(self.head, json.dumps({"seq": seq, "sha256": previous}).encode())
        return seq, previous

    def _head(self) -> tuple:
        if not self.head.exists():
            return 0, GENESIS
        data = json.loads(self.head.read_text())
        return data["seq"], data["sha256"]

    def check(self) -> AuditResult:
        """Walk the chain; the first line whose hash, predecessor or number is wrong is named."""
        if not self.path.exists():
            return AuditResult(not self.head.exists(), 0, None if not self.head.exists() else 1,
                               "" if not self.head.exists() else "audit.jsonl is missing but audit.head exists")
        previous, number, last = GENESIS, 0, None
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                problem = self._line_problem(raw, number, previous)
                if problem and not raw.endswith(b"\n"):
                    return AuditResult(True, number - 1, None, TORN_PARTIAL)
                if problem:
                    return AuditResult(False, number, number, problem)
                last = json.loads(raw)
                previous = last["sha256"]
        return self._check_head(number, previous, last)

    @staticmethod
    def _line_problem(raw: bytes, number: int, previous: str) -> str:
        try:
            entry = json.loads(raw)
            seq, prev, record, own = entry["seq"], entry["prev_sha256"], entry["record"], entry["sha256"]
        except (ValueError, KeyError, TypeError):
            return "not a valid audit entry"
        if own != _line_hash(seq, prev, record):
            return "edited: its content does not match its sha256"
        if prev != previous:
            return "chain broken: the line before it was removed, edited or reordered"
        if seq != number:
            return f"out of sequence: entry {seq} found at line {number} (lines removed or reordered)"
        return ""

    def _check_head(self, lines: int, last: str, last_entry: dict | None) -> AuditResult:
        seq, expected = self._head()
        if self.head.exists() and _chains_from(last_entry, seq, expected):
            return AuditResult(True, lines, None, TORN_HEAD)
        if self.head.exists() and (seq, expected) != (lines, last):
            return AuditResult(False, lines, lines + 1 if seq > lines else lines,
                               f"the log ends at entry {lines} but audit.head records entry {seq}: "
                               "lines were removed from the end or appended by hand")
        return AuditResult(True, lines)

    def entries(self):
        """The records in order (no checking)."""
        if self.path.exists():
            with open(self.path, "rb") as handle:
                for raw in handle:
                    yield json.loads(raw)


def _tail(handle) -> tuple[bytes, bytes]:
    """(last complete line, partial bytes after it) of an audit file open for reading."""
    size = handle.seek(0, os.SEEK_END)
    start = max(0, size - TAIL_BYTES)
    handle.seek(start)
    data = handle.read()
    cut = data.rfind(b"\n") + 1
    partial, lines = data[cut:], data[:cut].splitlines()
    handle.seek(0, os.SEEK_END)
    return (lines[-1] if lines and (start == 0 or len(lines) > 1) else b""), partial


def _chains_from(entry: dict | None, seq: int, sha256: str) -> bool:
    """True when `entry` is a sound entry appended right after the head (seq, sha256)."""
    try:
        return (entry["seq"] == seq + 1 and entry["prev_sha256"] == sha256
                and entry["sha256"] == _line_hash(entry["seq"], entry["prev_sha256"], entry["record"]))
    except (KeyError, TypeError):
        return False


def record_problems(state_dir) -> tuple[int, list[str]]:
    """(records checked, problems): each sync-state record must equal its batch's last audit entry.

    A record edited after it was written (say, to claim `verified`) no longer
    matches what the audit log kept; entries with an `event` (queue purges)
    are not batch records and are skipped.
    """
    last = {}
    for number, entry in enumerate(AuditLog(state_dir).entries(), start=1):
        record = entry.get("record") or {}
        if "event" not in record and "batch_id" in record:
            last[record["batch_id"]] = (number, record)
    store, problems, paths = SyncStateStore(state_dir), [], []
    if store.directory.is_dir():
        paths = sorted(store.directory.glob("*.json"))
    for path in paths:
        problem = _record_problem(path, last.get(path.stem))
        if problem:
            problems.append(f"sync-state/{path.name}: {problem}")
    return len(paths), problems


def _record_problem(path: Path, audited) -> str:
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        return f"unreadable: {error}"
    if audited is None:
        return "no audit entry for this batch"
    number, kept = audited
    fields = sorted(key for key in set(record) | set(kept) if record.get(key) != kept.get(key))
    if fields:
        return f"differs from the batch's last audit entry (line {number}) in {', '.join(fields)}"
    return ""


def audit_state(state_dir) -> AuditResult:
    """`state audit`: the audit log's chain, then every sync-state record against the log."""
    result = AuditLog(state_dir).check()
    result.records, result.record_problems = record_problems(state_dir)
    if result.record_problems:
        result.ok = False
        result.problem = result.problem if result.bad_line else result.record_problems[0]
    return result
