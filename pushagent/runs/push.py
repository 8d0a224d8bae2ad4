"""The push run: read -> build -> chunk -> send -> classify -> queue -> checkpoint.

The main thread reads, builds and chunks; `max_concurrency` worker threads
each resolve one chunk at a time. Results come back to the main thread,
which writes the retry queue and commits the checkpoint for the contiguous
prefix of resolved chunks. Memory holds at most as many uncommitted chunks
as the sender's concurrency limit allows now (cluster/concurrency.py), plus
the one being filled.
"""

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

from pushagent.cluster.bulk import ChunkSender, Outcome
from pushagent.cluster.connection import HttpCluster
from pushagent.cluster.ratelimit import bucket_for
from pushagent.cluster.transport import DryRunTransport, TransferStats
from pushagent.documents.builder import Builder, Rejected, iso_utc_from_ms
from pushagent.documents.buildpool import BuildPool, default_build_workers
from pushagent.documents.chunker import Chunker, Position
from pushagent.errors import (EXIT_FAILURE, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_OK, ChunkAborted,
                              ClusterUnavailableError, ConfigError, InputChangedError, PushAgentError, StopRequested,
                              StorageError)
from pushagent.inputs.reader import InputReadError, expand_inputs, next_line_start, read_lines
from pushagent.inputs.shard import Shard, file_ranges, run_key
from pushagent.runs.incremental import ChangeProbe
from pushagent.runs.record import BatchRecorder
from pushagent.runs.repeats import RepeatedIds
from pushagent.runs.settings import batch_generation_ms, build_settings, default_batch_id
from pushagent.runs.sharded import agreed_inputs
from pushagent.state.checkpoint import DONE_STATUSES, BatchLock, CheckpointStore, CommitTracker, RunState
from pushagent.state.ledger import Ledger
from pushagent.state.mirror import mirror_state
from pushagent.state.provenance import ContentRegistry, content_digest
from pushagent.state.records import utc_iso
from pushagent.state.retry_queue import QueueItem, open_configured_queue
from pushagent.state.slurm_env import slurm_facts

MAX_WARNINGS = 20
log = logging.getLogger(__name__)


@dataclasses.dataclass
class PushOptions:
    inputs: list
    batch_id: str | None = None
    restart: bool = False
    from_line: int | None = None
    on_error: str = "continue"
    dry_run: str | None = None
    shard: Shard | None = None
    verify: bool = True


@dataclasses.dataclass
class PushResult:
    """What the CLI reports; `exit_code` follows SPEC section 3."""

    batch_id: str
    status: str
    exit_code: int
    batch: Ledger
    this_run: Ledger
    stats: TransferStats
    duration_s: float
    position: Position
    error: Exception | None = None
    shard: str = ""
    slurm: dict = dataclasses.field(default_factory=dict)
    verification: dict | None = None
    mirror: dict | None = None
    duplicates: int = 0         # lines repeating an id of the batch (the later line won)
    dry_run: bool = False       # nothing was sent: what the ledger calls indexed is reported as would_send

    def report(self) -> dict:
        report = {"batch_id": self.batch_id, "status": self.status, **self.batch.as_dict(),
                  "duplicates": self.duplicates,
                  "this_run": self.this_run.as_dict(), "requests": self.stats.requests,
                  "retries": self.stats.retries, "probes": self.stats.probes, "bytes_raw": self.stats.bytes_raw,
                  "bytes_sent": self.stats.bytes_sent, "duration_s": round(self.duration_s, 3),
                  "docs_per_s": round(self.this_run.read / self.duration_s, 1) if self.duration_s else 0.0,
                  "position": self.position._asdict(), "statuses": self.stats.statuses,
                  "rate_per_minute": self.stats.rate_per_minute, "concurrency": self.stats.concurrency,
                  "concurrency_peak": self.stats.concurrency_peak, "requests_out_peak": self.stats.requests_out_peak,
                  "compress": self.stats.compress}
        report.update({key: value for key, value in (("shard", self.shard), ("slurm", self.slurm)) if value})
        if self.error:
            report["error"] = str(self.error)
        if self.verification is not None:
            report["verification"] = self.verification
        if self.mirror is not None:
            report["mirror"] = self.mirror
        if self.dry_run:
            for counters in (report, report["this_run"]):
                counters["would_send"] = counters.pop("indexed")
        return report


class PushRun:
    """One `pushagent push`: call run() once. `cluster` is where it sends (default: HTTP to config.url)."""

    def __init__(self, config, options: PushOptions, stop_event: threading.Event | None = None, observers=(),
                 cluster=None):
        self.config = config
        self.cluster = cluster or HttpCluster(config)
        self.observers = list(observers)
        self.options = options
        self.stop_event = stop_event or threading.Event()
        self.stats = TransferStats()
        self.files = self._inputs()
        self.store = CheckpointStore(config.state_path)
        batch_ms, known_batch_id = self._batch_version()
        self.build_settings = build_settings(config, batch_ms)
        self.settings = self._run_settings(batch_ms)
        # Shards of one batch share its id (documents, queue, sync-state), not their run state.
        self.batch_id = options.batch_id or known_batch_id or default_batch_id(self.files, self.settings)
        # Every document carries its batch: the batch is what verification proves, in an index many batches share.
        self.build_settings = dataclasses.replace(self.build_settings, batch_id=self.batch_id)
        self.ranges = file_ranges(self.files, options.shard)
        self.run_key = run_key(self.batch_id, options.shard)
        self._stop_reason = None
        self._fatal = None
        self._sender = None
        self.recorder = None
        self.builder = Builder(self.build_settings)
        self.repeats = None
        self.interruptible = False      # a stop signal may interrupt what runs now (verification reads only)
        self.probe = None               # --incremental: what the cluster already holds

    def _inputs(self) -> list:
        """The expanded inputs; for a shard, the list the batch's first shard found (sharded.agreed_inputs)."""
        config, options = self.config, self.options
        files = expand_inputs(options.inputs, config.s3_endpoint_url)
        array_job = slurm_facts().get("array_job_id")
        key = options.batch_id or (f"array-{array_job}" if array_job else None)
        if options.shard and key and not options.dry_run:
            return agreed_inputs(config.state_path, key, files, config.s3_endpoint_url)
        return files

    def _run_settings(self, batch_ms: int) -> dict:
        """What must not change while a batch resumes."""
        config = self.config
        return {"index": config.index, "index_field": config.index_field, "batch_version": batch_ms,
                "embedding_version": config.embedding_version, "id_field": config.id_field}

    def _batch_version(self) -> tuple:
        """(version in ms, batch id or None): the inputs' newest mtime, unless this content was pushed
        before, whose batch time and id it keeps (a copy must not pass for newer data)."""
        config, options = self.config, self.options
        batch_ms = batch_generation_ms(config, self.files)
        if config.batch_time or config.version_field or options.dry_run:
            return batch_ms, None
        batch_id = options.batch_id or default_batch_id(self.files, self._run_settings(batch_ms))
        resuming = self.store.load(run_key(batch_id, options.shard))
        if resuming is not None and resuming.status not in DONE_STATUSES:
            return batch_ms, None
        digest, registry = content_digest(self.files), ContentRegistry(config.state_path)
        known = registry.recall(digest)
        if known is None:
            registry.remember(digest, batch_id, batch_ms)
            return batch_ms, None
        if known["batch_version"] != batch_ms:
            log.warning("these inputs hold the content of batch %s, generated at %s: keeping that batch time, so "
                        "that this copy cannot overwrite newer data (--batch-time sets another)", known["batch_id"],
                        iso_utc_from_ms(known["batch_version"]))
        return known["batch_version"], known["batch_id"]

    def run(self) -> PushResult:
        """Push, record and verify; observers hear `finished` once the final status is known."""
        if self.options.dry_run:
            result = self._execute(self._fresh_state(), queue=None)
        else:
            result = self._push_and_record()
        self.notify("finished", result)
        return result

    def _push_and_record(self) -> PushResult:
        with BatchLock(self.config.state_path, self.run_key):
            saved = self.store.load(self.run_key)
            verify_only = saved is not None and self._verification_pending(saved)
            state = saved if verify_only else self._initial_state(saved)
            retry_queue = open_configured_queue(self.config)
            self.recorder = BatchRecorder(self.config, self.cluster, self.batch_id, self.build_settings, self.files,
                                          self.store, self.options.verify, self.options.shard)
            try:
                if verify_only:
                    result = self._verify(state, self._verification_only(state))
                else:
                    self.recorder.started(state)
                    result = self._verify(state, self._execute(state, retry_queue))
            except PushAgentError:
                self.recorder.write(state, "failed")
                raise
            finally:
                retry_queue.close()
                self.recorder.close()
            # After the sync-state record, so the mirror carries it too.
            result.mirror = mirror_state(self.config, self.batch_id, self.run_key)
            return result

    def _verify(self, state: RunState, result: PushResult) -> PushResult:
        """The recorder's final record and verification; a stop signal may cut the verification short (the
        batch stays `pushed`, and running the same command again verifies it)."""
        self.interruptible = True
        if self.options.verify and result.status == "pushed":
            self.notify("phase", "verifying")
        try:
            return self.recorder.finished(state, result)
        except StopRequested as signal_name:
            log.warning("%s: verification interrupted; the batch is pushed: run the same command again to verify it",
                        signal_name)
            result.status, result.exit_code = "pushed", EXIT_INTERRUPTED
            return result
        finally:
            self.interruptible = False

    def _verification_pending(self, state: RunState) -> bool:
        """The batch was pushed whole but not verified (its verification was interrupted, or waited for a
        drain): running the same command again verifies it instead of sending it all again."""
        return (state.status == "pushed" and self.options.verify and not self.options.restart
                and not self.options.from_line and state.inputs == self._fingerprints()
                and state.settings == self.settings)

    def _verification_only(self, state: RunState) -> PushResult:
        log.info("batch %s was pushed and is not verified yet: verifying it (--restart pushes it again)",
                 self.batch_id)
        self.recorder.cluster = self.recorder.client.info()
        batch = dataclasses.replace(state.counters)
        return PushResult(self.batch_id, "pushed", EXIT_INCOMPLETE if batch.unfinished else EXIT_OK, batch,
                          Ledger(), self.stats, 0.0, state.position, shard=state.shard, slurm=state.slurm,
                          duplicates=self.recorder.table.counts()["duplicates"])

    def _fingerprints(self) -> list:
        return [f.fingerprint() for f in self.files]

    def _initial_state(self, state: RunState | None) -> RunState:
        """Where this run starts: the saved state of an unfinished batch, or a new one."""
        inputs = self._fingerprints()
        if self.options.restart or (self.options.from_line and state is None):
            return self._fresh_state()
        if self.options.from_line:
            return self._state_from_line(state, inputs)
        if state is None or state.status in DONE_STATUSES:
            _refuse_changed_objects(self.store.states(), inputs)
            return self._fresh_state()
        _refuse_changed_objects([state], inputs)
        if state.inputs != inputs or state.settings != self.settings:
            raise ConfigError(f"batch {self.batch_id} has a checkpoint for other inputs or settings",
                              file=str(self.store.path(self.run_key)),
                              hint="push the original files, use another --batch-id, or --restart")
        state.status, state.slurm = "pushing", slurm_facts()
        return state

    def _state_from_line(self, state: RunState, inputs: list) -> RunState:
        """--from-line goes on with the batch's counters and documents: it moves where reading starts."""
        if state.inputs != inputs or state.settings != self.settings:
            raise ConfigError(f"batch {self.batch_id} was pushed from other inputs or settings: --from-line "
                              "continues a batch", file=str(self.store.path(self.run_key)),
                              hint="push the original files, or --restart --from-line N to begin the batch anew")
        fresh = self._fresh_state()
        state.position, state.status, state.slurm = fresh.position, "pushing", fresh.slurm
        return state

    def _fresh_state(self) -> RunState:
        """Nothing read yet: the position is the start of this run's first range (of its shard)."""
        position = Position(len(self.files), 0, 0)
        if self.ranges:
            first = self.ranges[0]
            position = Position(first.file_index, *next_line_start(self.files[first.file_index], first.start))
        return RunState(self.batch_id, self._fingerprints(), self.settings, position, started_at=utc_iso(),
                        key=self.run_key, shard=str(self.options.shard or ""), slurm=slurm_facts())

    def _execute(self, state: RunState, queue) -> PushResult:
        started = time.monotonic()
        this_run = Ledger()
        transport = (DryRunTransport(self.options.dry_run, self.stats) if self.options.dry_run
                     else self.cluster.transport(self.stats))
        limiter = bucket_for(self.config)
        sender = self._sender = ChunkSender(transport, self.config, self.stats, limiter, self.stop_event)
        if self.config.incremental and not self.options.dry_run:
            self.probe = ChangeProbe(self.config, self.cluster, self.build_settings, limiter, self.stop_event,
                                     self.stats)
        pump = _ChunkPump(self._resolve_chunk, self.config.concurrency_ceiling, sender.order)
        self.repeats = RepeatedIds(self.recorder.table.earlier_lines if self.recorder else lambda index, ids: {})
        committer = self._committer(state, queue, this_run)
        start = state.position
        self.notify("started", state)
        try:
            self._read_and_send(start, pump, committer)
            self._finish_in_flight(pump, committer)
        finally:
            pump.close()
            if self.probe is not None:
                self.probe.close()
        self._tell_replaced_stamps()
        return self._result(state, this_run, sender, time.monotonic() - started)

    def _committer(self, state: RunState, queue, this_run: Ledger) -> "_Committer":
        """The committer, given what it writes and whom it tells; a dry run (no queue) keeps nothing."""
        stop = (lambda: self.request_stop("on_error")) if self.options.on_error == "stop" else None
        hooks = _RunHooks(self.notify, self.fail, None if self.options.dry_run else self.store.save, stop)
        filing = None if queue is None else _Filing(self.batch_id, queue, self.recorder.resolved)
        return _Committer(state, this_run, hooks, filing, self.repeats)

    def _resolve_chunk(self, chunk, turn: int) -> Outcome:
        """Send a chunk (in a worker thread) in its `turn`; with --incremental only what the cluster does not
        hold yet."""
        if self.probe is None:
            return self._sender.resolve(chunk.docs, chunk, turn)
        send, unchanged = self.probe.split(chunk.docs)
        # The chunk holds what is sent only when every document is, as it was fed (none built since).
        whole = len(send) == len(chunk.docs) and all(sent is doc for sent, doc in zip(send, chunk.docs))
        outcome = self._sender.resolve(send, chunk if whole else None, turn) if send else Outcome()
        outcome.unchanged = unchanged
        return outcome

    def _tell_replaced_stamps(self) -> None:
        """Records may not carry the fields the agent stamps: their values are replaced, and the user told."""
        replaced = {field: count for field, count in self.builder.replaced_stamps.items() if count}
        if replaced:
            log.warning("records carried fields that pushagent stamps; their values were replaced: %s "
                        "(rename those fields in the input, or set the *_field options to other names)",
                        ", ".join(f"{field} in {count} records" for field, count in replaced.items()))

    def _read_and_send(self, start: Position, pump, committer) -> None:
        chunker = Chunker(self.config.chunk_docs, self.config.chunk_bytes, first_seq=committer.tracker.next_seq)
        with BuildPool(self.builder, self.config.build_workers or default_build_workers()) as pool:
            try:
                lines = self._lines(start)
                lines = self.probe.recognise(lines, self.builder) if self.probe else lines
                for item, position in pool.build(lines):
                    chunk = chunker.feed(item, position)
                    if chunk and not self._submit(chunk, pump, committer):
                        return
                    if self._stops_here(item):
                        break
            except (InputChangedError, StorageError) as error:
                self.fail(error)
                return
        self._submit_rest(chunker, pump, committer)

    def _lines(self, start: Position):
        """(raw line, file, line number, position after it) from `start`, in reading order. A file that cannot
        be read further ends with a Rejected line instead, and reading goes on with the next one."""
        from_line = self.options.from_line or 0
        for file_index, _, end in self.ranges:
            if file_index < start.file_index:
                continue
            input_file = self.files[file_index]
            # Only a run's first range starts inside a file, and the start position already points there.
            offset, line = (start.offset, start.line) if file_index == start.file_index else (0, 0)
            try:
                for entry in read_lines(input_file, offset, line, end):
                    if file_index == 0 and entry.number < from_line:
                        continue
                    yield entry.data, input_file.path, entry.number, Position(file_index, entry.end_offset,
                                                                               entry.number)
            except InputReadError as error:
                rejected = Rejected(error.message, b"", input_file.path, error.line)
                yield rejected, input_file.path, error.line, Position(file_index + 1, 0, 0)

    def _stops_here(self, item) -> bool:
        """--on-error stop reads no line after the first quarantined one. A document the cluster refuses is
        known only when its chunk comes back: then no further chunk is sent, those in flight finish."""
        return self.options.on_error == "stop" and isinstance(item, Rejected)

    def _submit_rest(self, chunker, pump, committer) -> None:
        chunk = chunker.flush()
        if chunk:
            self._submit(chunk, pump, committer)

    def _submit(self, chunk, pump, committer) -> bool:
        """Hand a chunk to a worker once fewer chunks are uncommitted than the sender's concurrency limit
        allows now, their bodies leave room for its own under `max_in_flight_bytes` (one chunk always
        goes), and after the chunks holding earlier lines of the ids it repeats.

        Counting uncommitted chunks, not just requests in flight, bounds memory
        and what a crash re-sends: a chunk resolved behind a slow one is not
        committed yet. Returns False when the run is stopping.
        """
        wait_for = self.repeats.mark(chunk)
        tracker, in_flight, budget = committer.tracker, self._sender.in_flight, self.config.max_in_flight_bytes

        def no_room() -> bool:
            over_budget = pump.in_flight and pump.held_bytes() + chunk.held_bytes > budget
            return chunk.seq - tracker.next_seq >= in_flight.limit or over_budget

        if no_room():
            in_flight.held()   # ready, and the limit keeps it back: more slots would be used
            if self.probe is None:      # --incremental builds and joins what it sends from the documents' bytes
                self._sender.pack_while_waiting(chunk)
        while not self._stopping() and (no_room() or tracker.next_seq <= wait_for):
            committer.handle(*pump.next_result(timeout=0.5))
        if self._stopping():
            return False
        pump.submit(chunk)
        return True

    def _finish_in_flight(self, pump, committer) -> None:
        deadline = time.monotonic() + self.config.grace_seconds if self._stopping() else None
        while pump.in_flight:
            if self.stop_event.is_set() and deadline is None:
                deadline = time.monotonic() + self.config.grace_seconds
            if deadline is not None and time.monotonic() > deadline:
                return
            committer.handle(*pump.next_result(timeout=0.5))

    def notify(self, event: str, *args) -> None:
        """Call `event(run, *args)` on each observer that has it (progress, metrics, logs).

        Events: started(state), chunk_resolved(chunk, ledger, error),
        committed(state, this_run), finished(result). Observers only read.
        """
        for observer in self.observers:
            handler = getattr(observer, event, None)
            if handler is not None:
                handler(self, *args)

    def request_stop(self, reason: str) -> None:
        self._stop_reason = self._stop_reason or reason
        self.stop_event.set()

    def fail(self, error: Exception) -> None:
        """Stop taking chunks; the first error decides the exit code."""
        self._fatal = self._fatal or error

    def _stopping(self) -> bool:
        return (self.stop_event.is_set() or self._fatal is not None or self._stop_reason is not None
                or self._sender.outage.tripped.is_set())

    def _result(self, state, this_run, sender, duration) -> PushResult:
        error, status, exit_code = self._fatal, "pushed", EXIT_OK
        if sender.outage.tripped.is_set() and error is None:
            error = sender.outage.error()
        finished = error is None and not self.stop_event.is_set() and self._stop_reason is None
        if isinstance(error, ClusterUnavailableError) and self.config.requeue_on_outage:
            # The checkpoint is clean: under Slurm the job is requeued and tries again, one budget later.
            status, exit_code = "interrupted", EXIT_INTERRUPTED
        elif error is not None:
            status, exit_code = "failed", getattr(error, "exit_code", EXIT_FAILURE)
        elif not finished:
            status, exit_code = "interrupted", EXIT_INTERRUPTED
            if self._stop_reason == "on_error":
                status, exit_code = "stopped", EXIT_INCOMPLETE
        batch = dataclasses.replace(state.counters)
        if finished:
            this_run.check("this run's")
            batch.check("the batch's")
            if batch.unfinished:
                exit_code = EXIT_INCOMPLETE
        if self.options.dry_run:
            status = "dry_run" if finished else status
        else:
            state.status = status
            state.updated_at = utc_iso()
            self.store.save(state)
        duplicates = self.recorder.table.counts()["duplicates"] if self.recorder else self.repeats.count
        return PushResult(self.batch_id, status, exit_code, batch, this_run, self.stats, duration,
                          state.position, error, state.shard, state.slurm, duplicates=duplicates,
                          dry_run=bool(self.options.dry_run))


class _ChunkPump:
    """`max_concurrency` daemon workers resolving chunks; results come back in completion order.

    Each chunk gets a ticket of `order` as it is handed out, and resolve(chunk,
    ticket) sends its first request in that turn. Daemon threads, so that a
    request still hanging when the grace period ends cannot keep the process
    from exiting with its checkpoint saved.
    """

    def __init__(self, resolve, concurrency: int, order):
        self.concurrency = concurrency
        self._order = order
        self._held = {}     # seq -> chunk handed out and not taken back: the bodies the pump holds
        self._work = queue.Queue()
        self._results = queue.Queue()
        self._threads = [threading.Thread(target=self._work_loop, args=(resolve,), daemon=True,
                                          name=f"pushagent-sender-{n}") for n in range(concurrency)]
        for thread in self._threads:
            thread.start()

    def _work_loop(self, resolve) -> None:
        for chunk, turn in iter(self._work.get, None):
            started = time.monotonic()
            try:
                result = (chunk, resolve(chunk, turn) if chunk.docs else None, None)
            except BaseException as error:  # handed to the main thread, which decides
                result = (chunk, None, error)
            finally:
                self._order.passed(turn)    # if its request never asked: nothing to send, or given up
            chunk.seconds = time.monotonic() - started
            self._results.put(result)
            del chunk, result  # do not hold a resolved chunk's body while waiting for the next one

    @property
    def in_flight(self) -> int:
        """Chunks handed out whose results have not been taken back."""
        return len(self._held)

    def submit(self, chunk) -> None:
        self._held[chunk.seq] = chunk
        self._work.put((chunk, self._order.ticket()))

    def held_bytes(self) -> int:
        """The bytes of the bodies of the chunks handed out and not taken back, packed or plain as now."""
        return sum(chunk.held_bytes for chunk in self._held.values())

    def next_result(self, timeout: float):
        try:
            result = self._results.get(timeout=timeout)
        except queue.Empty:
            return None, None, None
        del self._held[result[0].seq]
        return result

    def close(self) -> None:
        for _ in self._threads:
            self._work.put(None)


@dataclasses.dataclass
class _RunHooks:
    """What the committer hands back to its run; it reads nothing of the run itself."""

    notify: Callable                        # notify(event, *args): the run's observers
    fail: Callable                          # fail(error): an error that stops the run
    save: Callable | None                   # save(state): the checkpoint store's; None for a dry run
    stop_on_refused: Callable | None        # --on-error stop: stop() once a record is dead or quarantined


class _Committer:
    """Resolved chunks, in completion order: their documents kept at once, their counters and checkpoint
    committed over the contiguous prefix of resolved chunks (CommitTracker)."""

    def __init__(self, state: RunState, this_run: Ledger, hooks: _RunHooks, filing: "_Filing | None", repeats):
        self.state = state
        self.this_run = this_run
        self.hooks = hooks
        self.filing = filing            # None for a dry run: nothing is kept
        self.repeats = repeats
        self.tracker = CommitTracker(next_seq=0)
        self.warnings = _Warnings()

    def handle(self, chunk, outcome, error) -> None:
        if chunk is None:
            return
        self.repeats.resolved(chunk)
        if error is not None:
            self.hooks.notify("chunk_resolved", chunk, None, error)
            if not isinstance(error, ChunkAborted):
                self.hooks.fail(error)
            return
        ledger = self._keep(chunk, outcome)
        self.hooks.notify("chunk_resolved", chunk, ledger, None)
        for position, committed in self.tracker.resolved(chunk.seq, (chunk.end, ledger)):
            self._commit(position, committed)
        if ledger.dead + ledger.quarantined and self.hooks.stop_on_refused is not None:
            self.hooks.stop_on_refused()

    def _keep(self, chunk, outcome) -> Ledger:
        """The chunk's ledger; its documents filed (table, then retry queue) and its refused records told,
        all before the checkpoint may move past it."""
        ledger = _chunk_ledger(chunk, outcome)
        if self.filing is not None:
            self.filing.file(chunk, outcome)
        self.warnings.tell(chunk, outcome)
        return ledger

    def _commit(self, position: Position, ledger: Ledger) -> None:
        self.this_run.add(ledger)
        self.state.counters.add(ledger)
        self.state.position = position
        self.state.updated_at = utc_iso()
        if self.hooks.save is not None:
            self.hooks.save(self.state)
        self.hooks.notify("committed", self.state, self.this_run)


def _chunk_ledger(chunk, outcome) -> Ledger:
    """Where a chunk's records went; a chunk of quarantined lines only was not sent and has no outcome."""
    ledger = Ledger(read=chunk.records, quarantined=len(chunk.rejected))
    if outcome is not None:
        ledger.indexed, ledger.current, ledger.unchanged = (len(outcome.indexed), len(outcome.current),
                                                            len(outcome.unchanged))
        ledger.queued, ledger.dead = len(outcome.retry), len(outcome.dead)
    return ledger


class _Filing:
    """Where a resolved chunk's documents go: the batch's document table (what verification expects), then
    the retry queue (retryable ones to retry, refused and quarantined ones dead-lettered)."""

    def __init__(self, batch_id: str, queue, table_add):
        self.batch_id = batch_id
        self.queue = queue
        self.table_add = table_add      # BatchRecorder.resolved

    def file(self, chunk, outcome) -> None:
        if outcome is not None:
            self.table_add(outcome)
            self._queue_documents(outcome)
        self.queue.dead_letter([_line_item(self.batch_id, rejected) for rejected in chunk.rejected])

    def _queue_documents(self, outcome) -> None:
        batch_id = self.batch_id
        # A write the cluster took resolves what earlier runs left queued or dead for the same id.
        self.queue.resolve(outcome.indexed)
        self.queue.resolve(outcome.current, conflict=True)
        self.queue.put([_document_item(batch_id, doc, reason, "retryable") for doc, reason in outcome.retry])
        self.queue.dead_letter([_document_item(batch_id, doc, reason, "permanent") for doc, reason in outcome.dead])


class _Warnings:
    """One warning per unsendable record, file:line first, up to MAX_WARNINGS a run."""

    def __init__(self):
        self.count = 0

    def tell(self, chunk, outcome) -> None:
        problems = [(r.file, r.line, "quarantined", r.reason) for r in chunk.rejected]
        if outcome is not None:
            problems += [(doc.file, doc.line, "dead-lettered", reason) for doc, reason in outcome.dead]
        for file, line, what, reason in problems:
            self.count += 1
            if self.count <= MAX_WARNINGS:
                log.warning("%s:%s: %s: %s", file, line, what, reason)
            elif self.count == MAX_WARNINGS + 1:
                log.warning("more records were quarantined or dead-lettered: see `pushagent queue list`")


def _refuse_changed_objects(states, inputs: list) -> None:
    """Refuse when the latest run over an S3 object left it unfinished and its ETag has changed since.

    Changed local files simply make a new batch; for an S3 object, whose ETag
    is its identity, an abandoned half-pushed version is refused instead, so
    the user decides (restore it, or --restart with the new version).
    """
    etags = {f["path"]: f["etag"] for f in inputs if f.get("etag")}
    latest = {}                                     # path -> (updated_at, state, etag then)
    for state in states if etags else ():
        for old in state.inputs:
            if old["path"] in etags and latest.get(old["path"], ("",))[0] <= state.updated_at:
                latest[old["path"]] = (state.updated_at, state, old.get("etag"))
    for path, (_, state, etag) in latest.items():
        if state.status not in DONE_STATUSES and etag != etags[path]:
            raise InputChangedError(
                f"object changed since batch {state.batch_id} was checkpointed: ETag {etag} is now {etags[path]}; "
                "refusing to mix the two versions", file=path,
                hint="restore the object, or rerun with --restart to push the new version from the start")


def _line_item(batch_id: str, rejected: Rejected) -> QueueItem:
    """The dead-letter item of a quarantined line: no document could be built from it."""
    return QueueItem(QueueItem.line_key(batch_id, rejected.file, rejected.line), batch_id, None, None, None, None,
                     rejected.raw, rejected.file, rejected.line, "quarantined", rejected.reason)


def _document_item(batch_id: str, doc, reason: str, kind: str) -> QueueItem:
    return QueueItem(QueueItem.document_key(doc.index, doc.doc_id), batch_id, doc.index, doc.doc_id, doc.version,
                     doc.op, doc.source and bytes(doc.source), doc.file, doc.line, kind, reason or "",
                     version_type=doc.version_type)

