"""Progress of a push: a live bar on a terminal, one plain line every `progress_seconds` in a batch log.

Both are push observers (see PushRun.notify): they only read what the run
reports when a chunk is committed, so progress never runs ahead of what a
resume would keep. Percent is of input bytes, the one total known up front.
"""

import dataclasses
import logging
import os
import struct
import threading
import time


log = logging.getLogger("pushagent.progress")
GZIP_SIZE_WRAP = 2**32
MAX_DEFLATE_RATIO = 1032
DEFAULT_SCREEN = (120, 24)
# What a phase after pushing is called on its own line.
PHASES = {"verifying": "verifying batch {batch}: count, sample and timestamp checks"}


def estimated_size(path: str, size: int) -> int:
    """Uncompressed size of an input: the file size, or for .gz an estimate from the gzip trailer.

    The trailer holds the size modulo 4 GiB, so wrap it until it is at least
    the compressed size (JSONL always compresses). Offsets of .gz inputs
    count uncompressed bytes, hence the estimate; a wrong one only skews the
    percent, which is clamped.
    """
    if not path.endswith(".gz"):
        return size
    try:
        with open(path, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", handle.read(4))[0]
    except (OSError, struct.error):
        return size
    while isize < size:
        isize += GZIP_SIZE_WRAP
    # DEFLATE cannot compress more than about 1032:1: a larger "size" is no trailer at all, e.g. the
    # last bytes of a truncated file, and would show gigabytes for a few kilobytes.
    return isize if isize <= size * MAX_DEFLATE_RATIO else size


def input_sizes(fingerprints: list) -> list:
    """Estimated uncompressed size of each input, from checkpoint fingerprints (path, size)."""
    return [estimated_size(f["path"], f["size"]) for f in fingerprints]


def bytes_done(sizes: list, position, ranges=None) -> int:
    """Input bytes before `position` (file index, offset, line); of a shard's `ranges` only, when given."""
    done = 0
    for file_index, start, end in _spans(sizes, ranges):
        if file_index < position.file_index:
            done += end - start
        elif file_index == position.file_index:
            done += min(max(position.offset - start, 0), end - start)
    return done


def bytes_total(sizes: list, ranges=None) -> int:
    """Input bytes a run reads: all of `sizes`, or a shard's `ranges` (shard.FileRange) of them."""
    return sum(end - start for _, start, end in _spans(sizes, ranges))


def _spans(sizes: list, ranges) -> list:
    if ranges is None:
        return [(number, 0, size) for number, size in enumerate(sizes)]
    return [(number, start, sizes[number] if end is None else end) for number, start, end in ranges]


@dataclasses.dataclass
class Snapshot:
    """The facts a progress display shows; rates are over this run only."""

    batch_id: str
    records: int              # read in the whole batch, committed
    run_records: int          # of those, read by this run
    bytes_done: int
    bytes_total: int
    run_bytes: int            # input bytes committed by this run
    elapsed: float
    retries: int = 0
    queued: int = 0
    dead: int = 0
    rate_per_minute: float | None = None   # requests a minute the sender allows itself now (backpressure)
    concurrency: int | None = None         # requests the sender allows in flight now (it adapts)
    requests_out: int | None = None        # requests out now: fewer than allowed while memory or reading binds

    @property
    def percent(self) -> float:
        return min(100.0, 100.0 * self.bytes_done / self.bytes_total) if self.bytes_total else 100.0

    @property
    def docs_per_s(self) -> float:
        return self.run_records / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.run_bytes <= 0 or self.elapsed <= 0:
            return None
        return max(0.0, self.bytes_total - self.bytes_done) * self.elapsed / self.run_bytes

    @property
    def records_total(self) -> int | None:
        """Records in the whole input, extrapolated from the bytes done (3 significant digits until done)."""
        if not self.bytes_done:
            return None
        estimate = self.records * self.bytes_total / self.bytes_done
        if self.bytes_done >= self.bytes_total:
            return self.records
        return int(round(estimate, -max(0, len(str(round(estimate))) - 3)))

    def line(self) -> str:
        total = f"/~{self.records_total:,}" if self.records_total else ""
        return (f"{self.batch_id}: {self.records:,}{total} records | {human_bytes(self.bytes_done)}/"
                f"{human_bytes(self.bytes_total)} {self.percent:.1f}% | {self.docs_per_s:,.0f} docs/s | "
                f"ETA {human_duration(self.eta_s)} | retries {self.retries} queued {self.queued} dead {self.dead}"
                + (f" | rate {self.rate_per_minute:,.0f} req/min" if self.rate_per_minute is not None else "")
                + (f" | {self._in_flight()} in flight" if self.concurrency is not None else ""))

    def _in_flight(self) -> str:
        return str(self.concurrency) if self.requests_out is None else f"{self.requests_out} of {self.concurrency}"

    def fields(self) -> dict:
        """The same facts for a JSON log line."""
        return {"event": "progress", "batch_id": self.batch_id, "records": self.records,
                "records_total_estimate": self.records_total, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total, "percent": round(self.percent, 1),
                "docs_per_s": round(self.docs_per_s, 1),
                "eta_s": None if self.eta_s is None else round(self.eta_s), "retries": self.retries,
                "queued": self.queued, "dead": self.dead, "rate_per_minute": self.rate_per_minute,
                "concurrency": self.concurrency, "requests_out": self.requests_out}


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class _Tracker:
    """Turns run events into Snapshots; shared by the bar and the plain lines."""

    def __init__(self):
        self._lock = threading.Lock()
        self._run = None
        self._state = None
        self._started = time.monotonic()
        self._sizes = []
        self._ranges = None
        self._first_bytes = 0
        self._first_records = 0
        self._complete = False

    def started(self, run, state) -> None:
        with self._lock:
            self._run, self._state = run, state
            self._sizes = input_sizes([f.fingerprint() for f in run.files])
            self._ranges = run.ranges
            self._first_bytes = bytes_done(self._sizes, state.position, self._ranges)
            self._first_records = state.counters.read
            self._started = time.monotonic()

    def read_everything(self) -> None:
        """The run read all its input: the total is what it read, whatever the estimate said."""
        with self._lock:
            self._complete = True

    def snapshot(self) -> Snapshot | None:
        with self._lock:
            if self._state is None:
                return None
            counters = self._state.counters
            done = bytes_done(self._sizes, self._state.position, self._ranges)
            total = done if self._complete else bytes_total(self._sizes, self._ranges)
            return Snapshot(self._run.batch_id, counters.read, counters.read - self._first_records,
                            done, total, done - self._first_bytes, time.monotonic() - self._started,
                            self._run.stats.retries, counters.queued, counters.dead,
                            self._run.stats.rate_per_minute, self._run.stats.concurrency,
                            self._run.stats.requests_out)


class LogProgress:
    """One plain log line every `period` seconds, and one at the end: for Slurm output files."""

    def __init__(self, period: float):
        self.period = period
        self.tracker = _Tracker()
        self._stop = threading.Event()
        self._thread = None

    def started(self, run, state) -> None:
        self.tracker.started(run, state)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="pushagent-progress")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self._emit()

    def _emit(self) -> None:
        snapshot = self.tracker.snapshot()
        if snapshot is not None:
            log.info("progress %s", snapshot.line(), extra=snapshot.fields())

    def phase(self, run, name: str) -> None:
        """The push read everything and moves on (e.g. to verifying): its last line, then the new phase's."""
        self.close()
        self.tracker.read_everything()
        self._emit()
        log.info(PHASES.get(name, name).format(batch=run.batch_id))

    def finished(self, run, result) -> None:
        if self._thread is None and self._stop.is_set():
            return   # the push's last line was written when the next phase began
        self.close()
        self._emit()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class TerminalProgress:
    """A tqdm bar over input bytes, with records, docs/s and retries beside it."""

    BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"

    def __init__(self, stream):
        self.stream = stream
        self.tracker = _Tracker()
        self.bar = None
        self._redirect = None

    def started(self, run, state) -> None:
        # tqdm loads only for a terminal: an sbatch job's log lines need none of its ~4 MiB.
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.tracker.started(run, state)
        snapshot = self.tracker.snapshot()
        width, height = self._screen()
        self.bar = tqdm(total=snapshot.bytes_total, initial=snapshot.bytes_done, unit="B", unit_scale=True,
                        unit_divisor=1024, desc=run.batch_id[:32], file=self.stream, ncols=width, nrows=height,
                        bar_format=self.BAR_FORMAT, leave=True)
        # Log lines (warnings about records) are printed above the bar instead of through it.
        self._redirect = logging_redirect_tqdm([logging.getLogger("pushagent")])
        self._redirect.__enter__()
        self._show(snapshot)

    def _screen(self) -> tuple:
        """The terminal's columns and lines; a pseudo-terminal nobody sized says 0 x 0, which hides the bar."""
        try:
            size = os.get_terminal_size(self.stream.fileno())
        except (OSError, ValueError):
            return DEFAULT_SCREEN
        return size.columns or DEFAULT_SCREEN[0], size.lines or DEFAULT_SCREEN[1]

    def committed(self, run, state, this_run) -> None:
        if self.bar is not None:
            self._show(self.tracker.snapshot())

    def _show(self, snapshot: Snapshot) -> None:
        self.bar.set_postfix_str(f"{snapshot.records:,} records, {snapshot.docs_per_s:,.0f} docs/s, "
                                 f"retries {snapshot.retries}", refresh=False)
        self.bar.update(snapshot.bytes_done - self.bar.n)

    def phase(self, run, name: str) -> None:
        """The push read everything: the bar ends at what was read; the next phase gets a line of its own."""
        if self.bar is not None:
            self.tracker.read_everything()
            snapshot = self.tracker.snapshot()
            self.bar.total = snapshot.bytes_total
            self._show(snapshot)
        self.close()
        self.stream.write(PHASES.get(name, name).format(batch=run.batch_id) + " ...\n")
        self.stream.flush()

    def finished(self, run, result) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


def progress_for(stream, period: float):
    """The bar when `stream` is a terminal, else periodic log lines."""
    return TerminalProgress(stream) if stream.isatty() else LogProgress(period)
