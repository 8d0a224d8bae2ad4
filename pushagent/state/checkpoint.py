"""Run state of a batch: where reading is committed, written atomically; the batch lock.

The committed position only moves past a chunk once that chunk and every
chunk before it are resolved (indexed, current, queued or dead-lettered), so
a crash re-sends at most the chunks that were in flight.
"""

import dataclasses
import fcntl
import json
import os
from pathlib import Path

from pushagent.documents.chunker import Position
from pushagent.errors import BatchLockedError, PushAgentError
from pushagent.state.ledger import Ledger

DONE_STATUSES = ("pushed", "verified", "verification_failed")   # every record read; a new push starts over


@dataclasses.dataclass
class RunState:
    batch_id: str
    inputs: list                 # InputFile fingerprints, in reading order
    settings: dict               # what must not change on resume (index, versions...)
    position: Position = Position(0, 0, 0)
    counters: Ledger = dataclasses.field(default_factory=Ledger)     # the whole batch's, over all its runs
    status: str = "pushing"
    started_at: str = ""
    updated_at: str = ""
    key: str = ""                # file name: the batch id, plus the shard of an array task (shard.run_key)
    shard: str = ""              # "K/N" when one task of an array pushes its part of the batch
    slurm: dict = dataclasses.field(default_factory=dict)   # the Slurm job of the latest run (slurm_env)

    def __post_init__(self):
        self.key = self.key or self.batch_id

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)     # the ledger becomes its dict of counters
        data["position"] = self.position._asdict()
        data["files"] = [self._file_progress(i, fp) for i, fp in enumerate(self.inputs)]
        return data

    def _file_progress(self, index: int, fingerprint: dict) -> dict:
        if index < self.position.file_index:
            return {"path": fingerprint["path"], "done": True}
        if index == self.position.file_index:
            return {"path": fingerprint["path"], "offset": self.position.offset, "line": self.position.line,
                    "done": False}
        return {"path": fingerprint["path"], "offset": 0, "line": 0, "done": False}

    @classmethod
    def from_json(cls, data: dict) -> "RunState":
        """The run state of a checkpoint file's JSON; KeyError, TypeError or ValueError when it holds none."""
        if not isinstance(data, dict):
            raise TypeError(f"a run state is a JSON object, not {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["position"] = Position(**data["position"])
        if "counters" in values:
            values["counters"] = Ledger.from_dict(values["counters"])
        return cls(**values)


class CheckpointStore:
    """`<state_dir>/runs/<batch_id>.json`, replaced atomically (temp, fsync, rename)."""

    def __init__(self, state_dir: Path):
        self.directory = Path(state_dir) / "runs"

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, key: str) -> RunState | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return RunState.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as error:
            raise PushAgentError(f"checkpoint is unreadable: {error}", file=str(path),
                                 hint="rerun with --restart to start the batch over") from None

    def states(self):
        """Every readable run state of this state_dir (unreadable ones are skipped)."""
        for path in sorted(self.directory.glob("*.json")):
            try:
                yield RunState.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                continue

    def save(self, state: RunState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path(state.key), json.dumps(state.to_json(), indent=1).encode())


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file, never a mix."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise PushAgentError(f"cannot write {path}: {error.strerror}", file=str(path),
                             hint="free space or fix permissions in state_dir, then rerun") from None
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class CommitTracker:
    """Releases resolved chunks in sequence order: only a contiguous prefix commits."""

    def __init__(self, next_seq: int):
        self.next_seq = next_seq
        self._waiting = {}

    def resolved(self, seq: int, result) -> list:
        """Record chunk `seq` as resolved; return the results now committable, in order."""
        self._waiting[seq] = result
        ready = []
        while self.next_seq in self._waiting:
            ready.append(self._waiting.pop(self.next_seq))
            self.next_seq += 1
        return ready


class BatchLock:
    """An exclusive flock on `<state_dir>/runs/<batch_id>.lock` for the whole run."""

    def __init__(self, state_dir: Path, batch_id: str):
        self.path = Path(state_dir) / "runs" / f"{batch_id}.lock"
        self.batch_id = batch_id
        self._handle = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise BatchLockedError(f"batch {self.batch_id} is already being pushed (pid {holder})",
                                   hint="wait for that run to finish, or push another --batch-id") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
