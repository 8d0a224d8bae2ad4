"""Resolve every document of a chunk through a transport: item retries, 413 splits, outages, backpressure.

ChunkSender turns a list of documents into outcomes: it retries only the
failed subset with exponential backoff and full jitter, honours Retry-After,
splits a chunk answered with 413, rides out outages within `outage_seconds`
(see outage.py) and stops the whole run past it, slows the token bucket down
when the cluster pushes back, tells the concurrency limit (concurrency.py)
and the choice of encoding (compression.py) how each answer went, and warns
once per kind of error (errorlog.py). A push's chunks send their first
request in the order they were handed out (concurrency.SendingOrder).
"""

import dataclasses
import functools
import threading
import time

from pushagent.cluster.classifier import (CURRENT, INDEXED, MISSING_INDEX, REJECTED_EXECUTION, RETRYABLE, classify_item,
                                          item_error, request_outcome)
from pushagent.cluster.compression import Compression, Encoding
from pushagent.cluster.concurrency import ConcurrencyLimit, SendingOrder, Slot
from pushagent.cluster.errorlog import ErrorDigest, error_of_body
from pushagent.cluster.outage import OutageClock, backoff_delay
from pushagent.cluster.transport import BulkResponse, TransferStats, TransportFailure, gunzip_body, gzip_body
from pushagent.documents.chunker import Chunk, bulk_body
from pushagent.errors import AuthError, ChunkAborted, ConfigError, PushAgentError


@dataclasses.dataclass
class RequestFailed:
    """A whole request that got no usable answer: connection error, timeout, 429/5xx, wrong item count."""

    reason: str
    retry_after: float | None = None


@dataclasses.dataclass
class Sent:
    """What an answer measures: the request's slot in flight, its time (compression included) and its own
    share of it (ConcurrencyLimit.release), its size."""

    slot: Slot
    seconds: float
    own_seconds: float
    docs: int
    encoding: Encoding


@dataclasses.dataclass
class Outcome:
    """What became of a list of documents."""

    indexed: list = dataclasses.field(default_factory=list)
    current: list = dataclasses.field(default_factory=list)
    retry: list = dataclasses.field(default_factory=list)   # (doc, last error)
    dead: list = dataclasses.field(default_factory=list)    # (doc, reason)
    unchanged: list = dataclasses.field(default_factory=list)  # --incremental: held as written, not sent
    conflicts: dict = dataclasses.field(default_factory=dict)  # (index, id) -> the 409 of a current doc

    def merge(self, other: "Outcome") -> None:
        for name in ("indexed", "current", "retry", "dead", "unchanged"):
            getattr(self, name).extend(getattr(other, name))
        self.conflicts.update(other.conflicts)


def auth_refused(status: int) -> AuthError:
    """The error that stops a push on a whole-request 401 or 403 (the checkpoint is kept)."""
    if status == 401:
        return AuthError("the cluster refused the credentials (HTTP 401): the API key is missing, wrong, "
                         "expired or revoked",
                         hint="run `pushagent doctor` (check: authentication); the checkpoint is kept, "
                              "run the same command again once fixed")
    return AuthError(f"the key may not write to the target index (HTTP {status})",
                     hint="run `pushagent doctor` (check: privileges) and ask for read and write on the index; "
                          "the checkpoint is kept, run the same command again once fixed")


class ChunkSender:
    """Resolves documents to an Outcome through a transport (HTTP or dry run)."""

    def __init__(self, transport, config, stats: TransferStats, rate_limiter, stop_event: threading.Event,
                 clock=time.monotonic):
        self.transport = transport
        self.config = config
        self.stats = stats
        self.rate_limiter = rate_limiter
        self.stop_event = stop_event
        self.outage = OutageClock(config.outage_seconds, clock)
        self.errors = ErrorDigest()
        self.in_flight = ConcurrencyLimit(config.concurrency, config.concurrency_ceiling, clock)
        self.order = SendingOrder()
        self.compression = Compression(config.compress)
        self._gzip = functools.partial(gzip_body, level=config.compress_level)
        stats.rate_per_minute, stats.sending_limit = rate_limiter.rate_per_minute, self.in_flight
        stats.record_sending(self.in_flight.limit, self.compression.gzip)

    def resolve(self, docs: list, chunk: Chunk | None = None, turn: int | None = None) -> Outcome:
        """Send `docs` until each is indexed, current, dead, or out of in-run retries.

        `chunk`, when given, holds exactly `docs`: a request for all of them
        sends its body as it is instead of joining the documents (packed while
        out gzip'd). The documents of the outcome that have still to go
        somewhere (retry, dead) have their bytes. `turn`, a ticket of
        `order`, makes the first request wait for the chunks handed out
        before this one to leave (SendingOrder).
        Answers in which the cluster took nothing are retried within the
        outage budget; items refused among accepted ones get `max_retries`.

        Raises AuthError on 401/403 and ChunkAborted when the run is stopping
        (a signal, or the outage budget ran out: `outage.tripped`).
        """
        outcome = self._resolve(docs, chunk, turn)
        if chunk is not None and (outcome.retry or outcome.dead):
            chunk.unpack(gunzip_body)
        return outcome

    def _resolve(self, docs: list, chunk: Chunk | None, turn: int | None) -> Outcome:
        outcome, pending = Outcome(), docs
        streak, quiet, rounds = None, 0, 0   # start of this chunk's nothing-useful streak, its length; item rounds
        while True:
            answer, sent = self._attempt(self._body(pending, docs, chunk), len(pending), turn)
            turn = None     # only the first request keeps the order
            if isinstance(answer, RequestFailed):
                last_error, took, retry_after = answer.reason, False, answer.retry_after
            elif answer.status == 413:
                if chunk is not None:
                    chunk.unpack(gunzip_body)
                return self._split(pending, outcome)
            else:
                pending, last_error, took = self._classify(pending, answer.items, outcome, sent)
                if not pending:
                    return outcome
                retry_after = answer.retry_after
            if took:
                streak, quiet, rounds = None, 0, rounds + 1
                if rounds > self.config.max_retries:
                    outcome.retry.extend((doc, last_error) for doc in pending)
                    return outcome
                delay = backoff_delay(rounds, self.config.retry_backoff_seconds, self.config.max_backoff_seconds,
                                      retry_after, float("inf"))
            else:
                streak = self.outage.now() if streak is None else streak
                quiet += 1
                delay = self._outage_delay(streak, quiet, last_error, retry_after, isinstance(answer, RequestFailed))
                if delay is None:   # the cluster takes others' documents but never these: queue them
                    outcome.retry.extend((doc, last_error) for doc in pending)
                    return outcome
            self.stats.record_retry()
            self._pause(delay)

    def pack_while_waiting(self, chunk: Chunk) -> None:
        """A chunk that waits for room goes gzip'd already if gzip is in use: the wait costs the reading
        thread nothing, and the chunk holds less (fewer bytes under max_in_flight_bytes, more in flight).
        Not when a probe of `compress: auto` is due: a plain probe would unpack it again, past the budget
        it was let in under."""
        if self.compression.gzip and not self.compression.probe_due():
            chunk.pack(self._gzip)

    @staticmethod
    def _body(pending: list, docs: list, chunk: Chunk | None):
        """What a request for `pending` sends: the chunk when they are all its documents, else their NDJSON."""
        if chunk is not None:
            if pending is docs:
                return chunk
            chunk.unpack(gunzip_body)     # the documents' bytes back, to join those left
        return bulk_body(pending)

    def _attempt(self, body, docs: int, turn: int | None) -> tuple:
        """(a BulkResponse with one item per document (or a 413), else a RequestFailed saying why; what the
        answer measures, None without an answer)."""
        try:
            response, sent = self._post(body, docs, turn)
        except TransportFailure as error:
            self.errors.seen("request", "-", str(error).split(":")[0], str(error))
            return RequestFailed(str(error)), None
        kind = request_outcome(response.status)
        if kind == "fatal":
            raise PushAgentError(f"the cluster answered _bulk with {self._describe(response, docs)}",
                                 hint="check url: it must be the cluster's base URL")
        if kind == "auth":
            raise auth_refused(response.status)
        if kind == "too_large" or (kind == "ok" and len(response.items) == docs):
            return response, sent
        reason = self._describe(response, docs)
        error_type, text = error_of_body(response.text) if kind != "ok" else ("item_count_mismatch", reason)
        self.errors.seen("request", response.status, error_type, text if error_type != "error" else reason)
        if response.status == 429:
            self._pushed_back(sent, True)
        return RequestFailed(reason, response.retry_after), sent

    def _outage_delay(self, streak: float, quiet: int, reason: str, retry_after, whole: bool) -> float | None:
        """The wait before sending again while the cluster takes nothing; trips the run past the budget.

        None: the budget ran out for this chunk alone while the run gets useful
        answers, and its items were refused one by one: they go to the queue.
        A whole request refused that long stops the run instead: parking the
        chunk in the retry queue would only move the outage there.
        """
        left = self.outage.left(streak, reason)
        if left <= 0:
            if not whole and self.outage.run_left() > 0:
                return None
            self.outage.trip()
            raise ChunkAborted()
        return backoff_delay(quiet, self.config.retry_backoff_seconds, self.config.max_backoff_seconds,
                             retry_after, left)

    def _post(self, body: bytes, docs: int, turn: int | None) -> tuple:
        """(the answer, what it measures). A token of the rate limit first, then a slot in flight: a request
        held back by the rate takes no slot, so a full set of slots means the concurrency limit holds. Its
        turn, if it has one, before both; nothing leaves once the run stops."""
        slot = self._take_slot(turn)
        if slot is None:
            raise ChunkAborted()
        encoding = self.compression.pick()
        try:
            payload, raw_bytes = self._encode(body, encoding.gzip)
            response = self.transport.post(payload, docs, encoding.gzip, raw_bytes)
        finally:
            own_seconds = self.in_flight.release(slot)
        return response, Sent(slot, self.outage.now() - slot.sent_at, own_seconds, docs, encoding)

    def _take_slot(self, turn: int | None) -> Slot | None:
        """A rate token and a slot in flight, after the turn if there is one; None when the run stops."""
        try:
            if turn is not None and not self.order.wait(turn, self.stop_event):
                return None
            if self.stop_event.is_set() or self.outage.tripped.is_set():
                return None
            return self.in_flight.acquire(self.stop_event) if self.rate_limiter.acquire(self.stop_event) else None
        finally:
            if turn is not None:
                self.order.passed(turn)

    def _encode(self, body, gzip: bool) -> tuple:
        """(the payload of `body`, a Chunk or NDJSON bytes, gzip'd or plain; its plain length). A chunk keeps
        the gzip'd body instead of its own while a request is out (Chunk.pack), so a retry reuses it."""
        if isinstance(body, Chunk):
            return (body.pack(self._gzip) if gzip else body.unpack(gunzip_body)), body.body_bytes
        return (self._gzip(body) if gzip else body), len(body)

    def _pushed_back(self, sent: Sent, rejected: bool) -> None:
        """Backpressure: rejections halve the sending rate and the requests in flight; a clean answer raises
        the rate and tells the concurrency limit and the choice of encoding how long it took."""
        limiter = self.rate_limiter
        self.stats.rate_per_minute = limiter.slow_down() if rejected else limiter.speed_up()
        if rejected:
            limit = self.in_flight.rejected(sent.slot)
        else:
            limit = self.in_flight.answered(sent.slot, sent.seconds, sent.docs, sent.encoding.gzip)
            self.compression.answered(sent.encoding, sent.own_seconds, sent.docs)
        self.stats.record_sending(limit, self.compression.gzip)

    @staticmethod
    def _describe(response: BulkResponse, expected: int) -> str:
        if response.status != 200:
            return f"HTTP {response.status} {response.text[:200]}".strip()
        return f"answer has {len(response.items)} items for {expected} documents"

    def _classify(self, pending, items, outcome: Outcome, sent: Sent):
        """(documents to retry, last retry reason, whether the cluster took or judged any document)."""
        retry, last_error, refused = [], None, {}
        for doc, item in zip(pending, items):
            kind, reason = classify_item(item)
            if kind == INDEXED:
                outcome.indexed.append(doc)
            elif kind == CURRENT:
                outcome.current.append(doc)
                outcome.conflicts[(doc.index, doc.doc_id)] = reason
                continue    # a version conflict is the cluster holding ours or newer: no error to report
            elif kind == RETRYABLE:
                retry.append(doc)
                last_error = reason
            elif kind == MISSING_INDEX:
                raise ConfigError(f"index {doc.index!r} does not exist and the cluster does not create indices on "
                                  f"a write ({reason})", hint=f"ask the cluster's operator to create {doc.index!r} "
                                  "(with its mapping), then run the same command again")
            else:
                outcome.dead.append((doc, reason))
            if reason:
                status, error_type, text = item_error(item)
                refused.setdefault((status, error_type), [0, text])[0] += 1
        for (status, error_type), (count, reason) in refused.items():
            self.errors.seen("item", status, error_type, reason, count)
        self._pushed_back(sent, any(status == 429 or error_type in REJECTED_EXECUTION
                                    for status, error_type in refused))
        if len(retry) < len(pending):
            self.outage.useful()
        return retry, last_error, len(retry) < len(pending)

    def _split(self, docs, outcome: Outcome) -> Outcome:
        if len(docs) == 1:
            outcome.dead.append((docs[0], f"413 request too large: the document is {docs[0].size} bytes"))
            return outcome
        middle = len(docs) // 2
        for half in (docs[:middle], docs[middle:]):
            outcome.merge(self.resolve(half))
        return outcome

    def _pause(self, delay: float) -> None:
        """Wait `delay` seconds unless the run stops or another worker tripped the outage budget."""
        deadline = self.outage.now() + delay
        while not self.outage.tripped.is_set():
            left = deadline - self.outage.now()
            if left <= 0:
                return
            if self.stop_event.wait(min(left, 1.0)):
                break
        raise ChunkAborted()
