"""`pushagent drain`: send due retry-queue items through the same sender and classifier as push.

`max_concurrency` workers (as many sending at once as the sender's
concurrency limit allows) each loop: take (lease) up to chunk_docs items, rebuild
their bulk actions, resolve them with ChunkSender, then settle every item:
indexed or current -> ack; retryable -> fail (later attempt, dead after
max_attempts); permanent -> dead. An item the run could not resolve (signal,
cluster down) is released unchanged. A killed drainer's items come back when
their lease expires, so nothing is lost between take and ack.

`--all` makes the scope's pending items due once, at the start: an item this
drain fails keeps its backoff (1, 2, 4... minutes) instead of being taken
again at once and dead-lettered within a second. `--wait SECONDS` keeps the
drain looking while items of its scope wait for their next attempt.
"""

import dataclasses
import logging
import re
import threading
import time

from pushagent.cluster.bulk import ChunkSender, Outcome
from pushagent.cluster.connection import HttpCluster
from pushagent.cluster.ratelimit import bucket_for
from pushagent.cluster.transport import TransferStats
from pushagent.documents.builder import Doc, action_line
from pushagent.errors import EXIT_FAILURE, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_OK, ChunkAborted
from pushagent.ops.queue_view import EMPTY_STATS, counts_text
from pushagent.state.doctable import deletions_in
from pushagent.state.ledger import Ledger
from pushagent.state.records import utc_iso
from pushagent.state.retry_queue import REPAIR, QueueItem, open_configured_queue

log = logging.getLogger(__name__)
WAIT_POLL = 5.0   # seconds between looks at the queue while --wait waits for items to fall due


@dataclasses.dataclass
class DrainOptions:
    all: bool = False                 # ignore next-attempt times set before this drain
    batch_id: str | None = None
    max_items: int | None = None
    wait: float = 0.0                 # seconds to keep waiting for items of the scope to fall due


@dataclasses.dataclass
class DrainResult:
    """What the CLI reports; `exit_code` follows SPEC section 3.

    The ledger is the push's, over items instead of input lines: `read` is
    the items this drain took from the queue, reported as `taken` too, and
    each ends indexed or current (acknowledged), queued (back in the queue for
    a later attempt, or released unsent) or dead. `acked` is how many the
    queue removed: fewer than indexed + current when an item's lease ran out,
    or a newer version replaced it, before the answer came.
    """

    batch_id: str | None
    status: str
    exit_code: int
    ledger: Ledger
    acked: int
    stats: TransferStats
    duration_s: float
    remaining: dict
    error: Exception | None = None
    next_due_at: str | None = None     # when the first item waiting for a later attempt falls due

    def report(self) -> dict:
        report = {"batch_id": self.batch_id, "status": self.status, **self.ledger.as_dict(),
                  "taken": self.ledger.read, "acked": self.acked,
                  "requests": self.stats.requests, "retries": self.stats.retries,
                  "bytes_sent": self.stats.bytes_sent, "duration_s": round(self.duration_s, 3),
                  "items_per_s": round(self.ledger.read / self.duration_s, 1) if self.duration_s else 0.0,
                  "remaining": self.remaining, "statuses": self.stats.statuses}
        if self.next_due_at:
            report["next_due_at"] = self.next_due_at
        if self.error:
            report["error"] = str(self.error)
        return report


def next_due_at(queue, batch_id: str | None, look_at: int = 1000) -> str | None:
    """When the first pending item falls due (ISO 8601), among the oldest `look_at`: a person asking
    why nothing was sent wants to know how long to wait, not every item's time."""
    moment = time.time()
    times = [item.next_attempt_at for item in queue.list("pending", look_at, batch_id)
             if item.next_attempt_at > moment]
    if not times:
        return None
    return utc_iso(min(times))


def queue_doc(item: QueueItem) -> Doc:
    """The bulk document of a queued item, exactly as push built it."""
    op = item.op or "index"
    action = action_line(op, item.index, item.doc_id, item.version, item.version_type)
    return Doc(item.index, item.doc_id, item.version, op, action, item.source if op == "index" else None, "",
               item.input_file, item.line, item.version_type)


class DrainRun:
    """One `pushagent drain`: call run() once. `cluster` is where it sends (default: HTTP to config.url)."""

    def __init__(self, config, options: DrainOptions, stop_event: threading.Event | None = None, cluster=None):
        self.config = config
        self.cluster = cluster or HttpCluster(config)
        self.options = options
        self.stop_event = stop_event or threading.Event()
        self.stats = TransferStats()
        self.ledger = Ledger()
        self.acked = 0
        self._lock = threading.Lock()
        self._error = None
        self._stop_reason = None

    def run(self) -> DrainResult:
        started = time.monotonic()
        queue = open_configured_queue(self.config)
        self._wait_until = started + self.options.wait
        try:
            if self.options.all:
                # Once, before taking: what this drain fails keeps its backoff instead of being taken again.
                queue.make_due(self.options.batch_id)
            log.info("draining %s: %s", self.options.batch_id or "the retry queue", counts_text(self._scope(queue)))
            sender = self._sender()
            self._run_workers(queue, sender)
            if sender.outage.tripped.is_set() and self._error is None:
                self._error = sender.outage.error()
            if isinstance(self._error, Exception) and getattr(self._error, "exit_code", None) is None:
                raise self._error
            remaining = self._remaining(queue) if self._error is None else {}
            next_due = next_due_at(queue, self.options.batch_id) if remaining.get("later") else None
        finally:
            queue.close()
        return dataclasses.replace(self._result(remaining, time.monotonic() - started), next_due_at=next_due)

    def _sender(self) -> ChunkSender:
        limiter = bucket_for(self.config)
        return ChunkSender(self.cluster.transport(self.stats), self.config, self.stats, limiter, self.stop_event)

    def _run_workers(self, queue, sender) -> None:
        # Daemon threads, joined in short steps so signal handlers run and a hung request cannot block exit.
        threads = [threading.Thread(target=self._work, args=(queue, sender), daemon=True,
                                    name=f"pushagent-drain-{n}") for n in range(self.config.concurrency_ceiling)]
        for thread in threads:
            thread.start()
        deadline = None
        while any(thread.is_alive() for thread in threads):
            if self.stop_event.is_set() and deadline is None:
                deadline = time.monotonic() + self.config.grace_seconds
            if deadline is not None and time.monotonic() > deadline:
                return
            for thread in threads:
                thread.join(0.2)

    def _work(self, queue, sender) -> None:
        try:
            while not self._stopping():
                items = self._take(queue)
                if items:
                    self._drain(queue, sender, items)
                elif not self._wait_for_due(queue):
                    return
        except BaseException as error:  # the main thread reports it
            with self._lock:
                self._error = self._error or error
            self.stop_event.set()

    def _wait_for_due(self, queue) -> bool:
        """With --wait, while items of the scope wait for their next attempt: pause, then True (look again)."""
        left = self._wait_until - time.monotonic()
        if left <= 0 or self._taken_enough() or not self._remaining(queue)["later"]:
            return False
        return not self.stop_event.wait(min(WAIT_POLL, left))

    def _taken_enough(self) -> bool:
        return self.options.max_items is not None and self.taken >= self.options.max_items

    @property
    def taken(self) -> int:
        """Items taken from the queue so far: what a drain's ledger calls `read`."""
        return self.ledger.read

    def _take(self, queue) -> list:
        with self._lock:
            limit = self.config.chunk_docs
            if self.options.max_items is not None:
                limit = min(limit, self.options.max_items - self.taken)
            if limit <= 0:
                return []
            items = queue.take(limit, self.config.lease_seconds, self.options.batch_id)
            self.ledger.read += len(items)
        return items

    def _drain(self, queue, sender, items: list) -> None:
        by_key = {(item.index, item.doc_id): item for item in items}
        try:
            outcome = sender.resolve([queue_doc(item) for item in items])
        except ChunkAborted:
            queue.release(items)
            self._count(queued=len(items))
            return
        except BaseException:
            queue.release(items)
            raise
        if any(by_key[key].kind == REPAIR for key in outcome.conflicts):
            self._win_over_hand_edits(sender, outcome, by_key)
        self._settle(queue, outcome, by_key)

    def _win_over_hand_edits(self, sender, outcome: Outcome, by_key: dict) -> None:
        """A repair answered 409: the cluster holds a higher version. When a later batch wrote it, the repair
        is done (current); when an edit or a delete made by hand did, send it again at that version, which
        external_gte lets it replace."""
        repairs = [doc for doc in outcome.current if by_key[(doc.index, doc.doc_id)].kind == REPAIR]
        versions = self._versions_to_beat(repairs, outcome.conflicts, by_key)
        again = []
        for doc in repairs:
            item = by_key[(doc.index, doc.doc_id)]
            if versions.get((doc.index, doc.doc_id)) is not None:
                item.version = versions[(doc.index, doc.doc_id)]
                again.append(queue_doc(item))
        if again:
            resent = {(doc.index, doc.doc_id) for doc in again}
            outcome.current = [doc for doc in outcome.current if (doc.index, doc.doc_id) not in resent]
            outcome.merge(sender.resolve(again))

    def _versions_to_beat(self, docs: list, conflicts: dict, by_key: dict) -> dict:
        """{(index, id): the version the cluster holds} of the docs written by hand since; absent when a later
        batch wrote or deleted them."""
        field, versions = self.config.batch_field, {}
        with self.cluster.client() as client:
            for index in {doc.index for doc in docs}:
                ids = [doc.doc_id for doc in docs if doc.index == index]
                found = client.request("POST", f"/{index}/_mget", {"ids": ids},
                                       params={"_source_includes": field})["docs"]
                later_deletes = self._later_deletes(index, ids, by_key)
                for doc_id, doc in zip(ids, found):
                    item = by_key[(index, doc_id)]
                    stamp = doc.get("_source", {}).get(field) if doc.get("found") else None
                    if stamp not in (None, item.batch_id) or doc_id in later_deletes:
                        continue
                    held = doc["_version"] if doc.get("found") else _conflict_version(conflicts[(index, doc_id)])
                    if held is not None:
                        versions[(index, doc_id)] = held
        return versions

    def _later_deletes(self, index: str, ids: list, by_key: dict) -> set:
        """Ids another batch of this state directory deleted with a higher version than the queued one."""
        deleted = set()
        for table in (self.config.state_path / "runs").glob("*.docs.db"):
            deleted |= {doc_id for doc_id, version in deletions_in(table, index, ids).items()
                        if version > by_key[(index, doc_id)].version}
        return deleted

    def _settle(self, queue, outcome: Outcome, by_key: dict) -> None:
        def items(docs):
            return [by_key[(doc.index, doc.doc_id)] for doc in docs]
        acked = queue.ack(items(outcome.indexed + outcome.current))
        queue.resolve(outcome.indexed)
        queue.resolve(outcome.current, conflict=True)
        failed = _with_reasons(by_key, outcome.retry)
        queue.fail(failed)
        dead = _with_reasons(by_key, outcome.dead)
        queue.fail(dead, permanent=True)
        requeued = sum(1 for item in failed if item.status != "dead")
        self._count(indexed=len(outcome.indexed), current=len(outcome.current), queued=requeued,
                    dead=len(dead) + len(failed) - requeued, acked=acked)

    def _count(self, acked: int = 0, **outcomes) -> None:
        with self._lock:
            self.ledger.add(Ledger(**outcomes))
            self.acked += acked

    def _remaining(self, queue) -> dict:
        """Items of this drain's scope still in the queue; leased ones are another drainer's."""
        stats = self._scope(queue)
        return {name: stats.get(name, 0) for name in ("due", "later", "leased", "dead")}

    def _scope(self, queue) -> dict:
        stats = queue.stats()
        if self.options.batch_id is not None:
            stats = stats["batches"].get(self.options.batch_id, EMPTY_STATS)
        return stats

    def request_stop(self, reason: str) -> None:
        self._stop_reason = self._stop_reason or reason
        self.stop_event.set()

    def _stopping(self) -> bool:
        return self.stop_event.is_set() or self._error is not None

    def _result(self, remaining: dict, duration: float) -> DrainResult:
        status, exit_code, error = "drained", EXIT_OK, self._error
        if error is not None:
            status, exit_code = "failed", getattr(error, "exit_code", EXIT_FAILURE)
        elif self._stop_reason is not None:
            status, exit_code = "interrupted", EXIT_INTERRUPTED
        else:
            self.ledger.check("this drain's")
            if remaining["due"] + remaining["later"] + remaining["dead"]:
                status, exit_code = "incomplete", EXIT_INCOMPLETE
        return DrainResult(self.options.batch_id, status, exit_code, self.ledger, self.acked, self.stats,
                           duration, remaining, error)


def _conflict_version(reason: str) -> int | None:
    """The version a 409 says the cluster holds ("current version [7] is higher than ...")."""
    match = re.search(r"current version \[(\d+)\]", reason or "")
    return int(match[1]) if match else None


def _with_reasons(by_key: dict, pairs) -> list:
    """Queue items for (doc, reason) pairs, with the reason as their last error."""
    items = []
    for doc, reason in pairs:
        item = by_key[(doc.index, doc.doc_id)]
        item.last_error = reason or ""
        items.append(item)
    return items
