"""Send bulk requests and resolve every document of a chunk.

HttpTransport speaks HTTP (gzip, auth header, TLS, timeouts, one session per
worker). ChunkSender turns a list of documents into outcomes: it retries only
the failed subset with exponential backoff and full jitter, honours
Retry-After, splits a chunk answered with 413, rides out outages within
`outage_seconds` (see outage.py) and stops the whole run past it, slows the
token bucket down when the cluster pushes back, and warns once per kind of
error (errorlog.py).
"""

import dataclasses
import email.utils
import itertools
import queue
import ssl
import threading
import time
import zlib
from pathlib import Path

import orjson
import requests

try:  # Intel's igzip: the same gzip format, ~3x zlib's speed at level 1 on this data (benchmarks/)
    from isal import isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; zlib stays correct without it
    isal_zlib = None

from . import __version__
from .chunker import bulk_body
from .classifier import (CURRENT, INDEXED, MISSING_INDEX, REJECTED_EXECUTION, RETRYABLE, classify_item,
                         item_error, request_outcome)
from .errorlog import ErrorDigest, error_of_body
from .errors import AuthError, ConfigError, PushAgentError
from .outage import OutageClock, backoff_delay
from .ratelimit import InFlightLimit
from .security import find_ssl_error, secure_session, tls_failure

# Only what the classifier reads: a 5000-item answer stays small.
BULK_FILTER = "errors,items.*.status,items.*.error.type,items.*.error.reason"
CONNECT_TIMEOUT = 10


class TransportFailure(Exception):
    """No usable HTTP answer: connection refused or reset, timeout, unreadable body."""


@dataclasses.dataclass
class BulkResponse:
    status: int
    items: list | None = None
    retry_after: float | None = None
    text: str = ""


@dataclasses.dataclass
class RequestFailed:
    """A whole request that got no usable answer: connection error, timeout, 429/5xx, wrong item count."""

    reason: str
    retry_after: float | None = None


class ChunkAborted(Exception):
    """The run is stopping (signal, or the outage budget ran out): the chunk stays unresolved."""


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


class TransferStats:
    """Counters shared by all workers."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = self.retries = self.bytes_raw = self.bytes_sent = self.probes = 0
        self.statuses = {}
        self.latencies = []
        self.request_docs = []   # documents in each request, in the order of latencies
        self.rate_per_minute = None   # the rate the token bucket sends at now (backpressure lowers it)

    def record_request(self, status, raw, sent, seconds, docs=0):
        with self._lock:
            self.requests += 1
            self.bytes_raw += raw
            self.bytes_sent += sent
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            self.latencies.append(seconds)
            self.request_docs.append(docs)

    def record_retry(self):
        with self._lock:
            self.retries += 1

    def record_probe(self):
        """One `_mget` of --incremental asking what the cluster holds (it spends the rate limit too)."""
        with self._lock:
            self.probes += 1


class HttpTransport:
    """POSTs _bulk bodies; one requests.Session per worker for connection reuse."""

    def __init__(self, config, auth_header: dict, stats: TransferStats):
        self.url = config.url.rstrip("/") + "/_bulk"
        self.config = config
        self.stats = stats
        self._headers = {"Content-Type": "application/x-ndjson", "User-Agent": f"pushagent/{__version__}",
                         **auth_header}
        if config.compress:
            self._headers["Content-Encoding"] = "gzip"
        self._sessions = queue.LifoQueue()

    def post(self, body, docs: int = 0) -> BulkResponse:
        """POST an NDJSON body (bytes-like), gzip'd when `compress` is on."""
        payload = gzip_body(body, self.config.compress_level) if self.config.compress else body
        session = self._session()
        started = time.monotonic()
        try:
            reply = session.post(self.url, params={"filter_path": BULK_FILTER}, data=payload,
                                 headers=self._headers,
                                 timeout=(CONNECT_TIMEOUT, self.config.timeout_seconds))
            self.stats.record_request(reply.status_code, len(body), len(payload), time.monotonic() - started, docs)
            return _parse_reply(reply)
        except requests.exceptions.SSLError as error:
            if not isinstance(find_ssl_error(error), ssl.SSLCertVerificationError):
                session.close()  # a handshake cut short is a connection failure: retried
                raise TransportFailure(f"SSLError: {_first_line(error)}") from None
            message, hint = tls_failure(error, self.config.url)
            raise PushAgentError(message, hint=hint + "; `pushagent doctor` shows the certificate") from None
        except (requests.RequestException, OSError) as error:
            session.close()
            raise TransportFailure(f"{type(error).__name__}: {_first_line(error)}") from None
        finally:
            self._sessions.put(session)

    def _session(self) -> requests.Session:
        try:
            return self._sessions.get_nowait()
        except queue.Empty:
            return secure_session(self.config.ca_bundle)


def gzip_body(body, level: int) -> bytes:
    """gzip `body` in one pass (wbits=31: gzip container, no extra copies); levels 0-3 use igzip."""
    if isal_zlib is not None and level <= 3:
        return isal_zlib.compress(body, level, wbits=31)
    return zlib.compress(body, level, wbits=31)


class DryRunTransport:
    """Writes each request body to DIR instead of sending it, and answers success."""

    def __init__(self, directory: str, stats: TransferStats):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stats = stats
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def post(self, body: bytes, docs: int = 0) -> BulkResponse:
        with self._lock:
            number = next(self._numbers)
        (self.directory / f"request-{number:06d}.ndjson").write_bytes(body)
        self.stats.record_request(200, len(body), 0, 0.0, docs)
        return BulkResponse(200, [{next(iter(orjson.loads(action))): {"status": 201}}
                                  for action in _action_lines(body)])


def _action_lines(body: bytes):
    lines = body.split(b"\n")
    index = 0
    while index < len(lines) and lines[index]:
        action = lines[index]
        yield action
        index += 1 if b'"delete"' in action[:12] else 2


def _parse_reply(reply: requests.Response) -> BulkResponse:
    retry_after = parse_retry_after(reply.headers.get("Retry-After"))
    if reply.status_code != 200:
        return BulkResponse(reply.status_code, None, retry_after, reply.text[:500])
    try:
        data = orjson.loads(reply.content)
    except orjson.JSONDecodeError:
        raise TransportFailure(f"unreadable bulk answer: {reply.content[:200]!r}") from None
    return BulkResponse(200, data.get("items", []), retry_after)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


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


def _first_line(error) -> str:
    return str(error).splitlines()[0][:300] if str(error) else type(error).__name__


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
        self.in_flight = InFlightLimit(config.concurrency)
        stats.rate_per_minute = rate_limiter.rate_per_minute

    def resolve(self, docs: list, body=None) -> Outcome:
        """Send `docs` until each is indexed, current, dead, or out of in-run retries.

        `body`, when given, is the NDJSON of exactly `docs` (a chunk's body):
        the first attempt sends it as it is instead of joining the documents.
        Answers in which the cluster took nothing are retried within the
        outage budget; items refused among accepted ones get `max_retries`.

        Raises AuthError on 401/403 and ChunkAborted when the run is stopping
        (a signal, or the outage budget ran out: `outage.tripped`).
        """
        outcome, pending = Outcome(), docs
        streak, quiet, rounds = None, 0, 0   # start of this chunk's nothing-useful streak, its length; item rounds
        while True:
            answer = self._attempt(body if body is not None and pending is docs else bulk_body(pending), len(pending))
            if isinstance(answer, RequestFailed):
                last_error, took, retry_after = answer.reason, False, answer.retry_after
            elif answer.status == 413:
                return self._split(pending, outcome)
            else:
                pending, last_error, took = self._classify(pending, answer.items, outcome)
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

    def _attempt(self, body: bytes, docs: int):
        """A BulkResponse with one item per document (or a 413), else a RequestFailed saying why."""
        try:
            response = self._post(body, docs)
        except TransportFailure as error:
            self.errors.seen("request", "-", str(error).split(":")[0], str(error))
            return RequestFailed(str(error))
        kind = request_outcome(response.status)
        if kind == "fatal":
            raise PushAgentError(f"the cluster answered _bulk with {self._describe(response, docs)}",
                                 hint="check url: it must be the cluster's base URL")
        if kind == "auth":
            raise auth_refused(response.status)
        if kind == "too_large" or (kind == "ok" and len(response.items) == docs):
            return response
        reason = self._describe(response, docs)
        error_type, text = error_of_body(response.text) if kind != "ok" else ("item_count_mismatch", reason)
        self.errors.seen("request", response.status, error_type, text if error_type != "error" else reason)
        if response.status == 429:
            self._pushed_back(True)
        return RequestFailed(reason, response.retry_after)

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

    def _post(self, body: bytes, docs: int) -> BulkResponse:
        if self.outage.tripped.is_set() or not self.in_flight.acquire(self.stop_event):
            raise ChunkAborted()
        try:
            if not self.rate_limiter.acquire(self.stop_event):
                raise ChunkAborted()
            return self.transport.post(body, docs)
        finally:
            self.in_flight.release()

    def _pushed_back(self, rejected: bool) -> None:
        """Backpressure: rejections halve the sending rate and the requests in flight, clean answers raise them."""
        limiter = self.rate_limiter
        self.stats.rate_per_minute = limiter.slow_down() if rejected else limiter.speed_up()
        (self.in_flight.slow_down if rejected else self.in_flight.speed_up)()

    @staticmethod
    def _describe(response: BulkResponse, expected: int) -> str:
        if response.status != 200:
            return f"HTTP {response.status} {response.text[:200]}".strip()
        return f"answer has {len(response.items)} items for {expected} documents"

    def _classify(self, pending, items, outcome: Outcome):
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
        self._pushed_back(any(status == 429 or error_type in REJECTED_EXECUTION for status, error_type in refused))
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
