"""Building spread over processes: `build_workers` processes parse, checksum and stamp the lines that the
main process reads, and their documents come back in reading order.

The main process keeps reading, chunking and committing, so nothing the
checkpoint relies on changes: each document arrives with the position of its
line, in the order of the lines, and a chunk is exactly what one process would
have made. Lines go out in batches (a few hundred, so that passing them costs
little next to building them), at most two batches a worker ahead of the
chunker, which bounds the memory. With one worker everything stays in this
process.
"""

import collections
import ctypes
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

from pushagent.documents.builder import Builder, Doc, Rejected

BATCH_LINES = 256               # lines a worker builds per task,
BATCH_BYTES = 4 * 1024**2       # and at most these bytes of them (but one line, whatever its size)
AHEAD_PER_WORKER = 2            # tasks a worker may be given before the chunker has taken the first
MAX_DEFAULT_WORKERS = 8         # past this, reading and chunking in the main process are the bound

PR_SET_PDEATHSIG = 1            # prctl(2): the signal a process gets when its parent dies
_worker_builder = None          # in a worker process: its Builder


def job_cores(environ=None) -> int:
    """The cores this process may use: its CPU affinity, and SLURM_CPUS_PER_TASK when a job sets fewer."""
    environ = os.environ if environ is None else environ
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):       # not Linux
        cores = os.cpu_count() or 1
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cores, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else cores


def default_build_workers(environ=None) -> int:
    """One core stays with the main process (reading, chunking, sending); on two cores or fewer, 1: the
    building stays in the main process, where it costs nothing to hand over."""
    cores = job_cores(environ)
    return 1 if cores <= 2 else min(cores - 1, MAX_DEFAULT_WORKERS)


class BuildPool:
    """build(lines) turns (raw line, file, line number, position) into (Doc or Rejected, position), in the order
    given; an item given instead of a raw line (a Rejected, a known Doc) passes as it is.
    `builder.replaced_stamps` counts for every process."""

    def __init__(self, builder: Builder, workers: int):
        self.builder = builder
        self.workers = workers
        self._executor = None

    def __enter__(self):
        if self.workers > 1:
            # spawn: a worker starts clean instead of forked from this process and its threads, and this
            # process reaps it, so its CPU time counts in this process's children's.
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker,
                                                 initargs=(self.builder.settings, os.getpid()))
        return self

    def __exit__(self, *exc):
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        return False

    def build(self, lines):
        if self._executor is None:
            return self._build_here(lines)
        return self._build_in_workers(lines)

    def _build_here(self, lines):
        build = self.builder.build
        for raw, file, number, position in lines:
            yield (build(raw, file, number) if isinstance(raw, bytes) else raw), position

    def _build_in_workers(self, lines):
        """Keep up to AHEAD_PER_WORKER tasks per worker submitted; yield their results in submission order.

        An error of the reader (a changed input) comes after every line read before it, as with one process.
        """
        pending, ahead = collections.deque(), self.workers * AHEAD_PER_WORKER
        batches = batched(lines, BATCH_LINES, BATCH_BYTES)
        failure = None
        while True:
            while failure is None and len(pending) < ahead:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except Exception as error:  # raised again once the lines before it are built
                    failure = error
                    break
                pending.append((self._executor.submit(_build_batch, *_packed(batch)), batch))
            if not pending:
                break
            future, batch = pending.popleft()
            built, replaced = future.result()
            for field, count in replaced.items():
                self.builder.replaced_stamps[field] += count
            yield from zip(_unpacked(built, batch), (line[3] for line in batch))
        if failure is not None:
            raise failure


def _packed(batch) -> tuple:
    """What a worker needs of a batch, in few objects (one bytes for all lines): passing it costs little.
    Items already made (Rejected, known Docs) stay here: a worker gets no bytes for them."""
    raws = [raw if isinstance(raw, bytes) else b"" for raw, *_ in batch]
    return b"".join(raws), [len(raw) for raw in raws], [(file, number) for _, file, number, _ in batch]


def _unpacked(built, batch):
    """The items of a batch from a worker's answer: documents point into its one bytes, no copy."""
    view, start = memoryview(built.data), 0
    for (raw, file, number, _), entry in zip(batch, built.entries):
        if not isinstance(raw, bytes):
            yield raw
        elif len(entry) == 2:
            yield Rejected(entry[0], entry[1], file, number)
        else:
            index, doc_id, version, op, checksum, digest, action_end, source_end = entry
            action, source = view[start:start + action_end], view[start + action_end:start + source_end]
            yield Doc(index, doc_id, version, op, action, source if source_end > action_end else None, checksum,
                      file, number, digest=digest)
            start += source_end


def batched(lines, size: int, max_bytes: int):
    """Lists of at most `size` (raw line, ...) lines and `max_bytes` of raw lines (or one longer line); when
    reading fails, the lines read before go out first."""
    batch, nbytes = [], 0
    try:
        for line in lines:
            batch.append(line)
            nbytes += len(line[0]) if isinstance(line[0], bytes) else 0
            if len(batch) >= size or nbytes >= max_bytes:
                yield batch
                batch, nbytes = [], 0
    except Exception:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


def _start_worker(settings, parent: int) -> None:
    global _worker_builder
    # Stop signals are the main process's to handle: it finishes what is in flight, then ends the workers.
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    _die_with(parent)
    _worker_builder = Builder(settings)


def _die_with(parent: int) -> None:
    """A worker waits for work on a pipe it holds both ends of: when the main process is killed (SIGKILL, the
    node's OOM killer), nothing would end it. Linux ends it then (PR_SET_PDEATHSIG); elsewhere it stays."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:      # it died before the call
        os._exit(1)


class _Built(NamedTuple):
    """A worker's answer for a batch: the action and source lines of its documents end to end in `data`;
    per line (index, id, version, op, checksum, digest, end of action, end of source), ends relative to the
    document's start,
    or (reason, raw) for a line that cannot be sent."""

    data: bytes
    entries: list


def _build_batch(data: bytes, lengths: list, lines: list) -> tuple:
    """In a worker: build each (file, number) line of `data`; (_Built, the stamps they replaced)."""
    builder = _worker_builder
    builder.replaced_stamps = dict.fromkeys(builder.replaced_stamps, 0)
    parts, entries, start = [], [], 0
    for length, (file, number) in zip(lengths, lines):
        raw, start = data[start:start + length], start + length
        item = builder.build(raw, file, number) if raw else None
        if isinstance(item, Doc):
            source = item.source or b""
            parts += (item.action, source)
            entries.append((item.index, item.doc_id, item.version, item.op, item.checksum, item.digest,
                            len(item.action), len(item.action) + len(source)))
        else:
            entries.append((item.reason, item.raw) if item else ("", b""))
    return _Built(b"".join(parts), entries), builder.replaced_stamps
