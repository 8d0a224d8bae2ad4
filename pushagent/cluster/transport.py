"""The transport of bulk requests: one `post(payload, docs, gzip, raw_bytes) -> BulkResponse` for every way a
body can travel; the sender encodes the payload (gzip_body here), the transport carries it.

HttpTransport speaks HTTP (auth header, TLS, timeouts, one session per
worker); DryRunTransport writes the bodies to files. ChunkSender (bulk.py)
takes either, and tests hand it an in-memory cluster. TransferStats counts
what went over the wire.
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

from pushagent import __version__
from pushagent.cluster.tls import find_ssl_error, secure_session, tls_failure
from pushagent.errors import PushAgentError

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


class TransferStats:
    """Counters shared by all workers."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = self.retries = self.bytes_raw = self.bytes_sent = self.probes = 0
        self.statuses = {}
        self.latencies = []
        self.request_docs = []   # documents in each request, in the order of latencies
        self.rate_per_minute = None   # the rate the token bucket sends at now (backpressure lowers it)
        self.concurrency = None       # requests the sender allows in flight now (it finds the level itself)
        self.concurrency_peak = 0
        self.sending_limit = None     # the ConcurrencyLimit whose slots are the requests out
        self.compress = None          # whether the requests go gzip'd now (compress: auto measures it)

    def record_request(self, status, raw, sent, seconds, docs=0):
        with self._lock:
            self.requests += 1
            self.bytes_raw += raw
            self.bytes_sent += sent
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            self.latencies.append(seconds)
            self.request_docs.append(docs)

    def record_sending(self, concurrency: int, compress: bool):
        with self._lock:
            self.concurrency, self.compress = concurrency, compress
            self.concurrency_peak = max(self.concurrency_peak, concurrency)

    @property
    def requests_out(self) -> int:
        """Requests sent and not answered now (the limit may allow more)."""
        return 0 if self.sending_limit is None else self.sending_limit.taken

    @property
    def requests_out_peak(self) -> int:
        return 0 if self.sending_limit is None else self.sending_limit.taken_peak

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
        self._gzip_headers = {**self._headers, "Content-Encoding": "gzip"}
        self._sessions = queue.LifoQueue()

    def post(self, payload, docs: int, gzip: bool, raw_bytes: int) -> BulkResponse:
        """POST an NDJSON body (bytes-like), gzip'd already when `gzip` (the sender encodes: compression.py);
        `raw_bytes` is its plain length, for the counters."""
        session = self._session()
        started = time.monotonic()
        try:
            reply = session.post(self.url, params={"filter_path": BULK_FILTER}, data=payload,
                                 headers=self._gzip_headers if gzip else self._headers,
                                 timeout=(CONNECT_TIMEOUT, self.config.timeout_seconds))
            self.stats.record_request(reply.status_code, raw_bytes, len(payload), time.monotonic() - started, docs)
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


def gunzip_body(payload) -> bytes:
    """The plain body of a gzip_body() payload."""
    return (isal_zlib or zlib).decompress(payload, wbits=31)


class DryRunTransport:
    """Writes each request body to DIR instead of sending it, and answers success."""

    def __init__(self, directory: str, stats: TransferStats):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stats = stats
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def post(self, payload, docs: int, gzip: bool, raw_bytes: int) -> BulkResponse:
        """Write the plain body, whatever the encoding: the files are there to be read."""
        body = gunzip_body(payload) if gzip else payload
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


def _first_line(error) -> str:
    return str(error).splitlines()[0][:300] if str(error) else type(error).__name__


