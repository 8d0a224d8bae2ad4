"""A fault-injecting HTTP proxy for tests: sits between the agent and the real cluster.

Every request is forwarded to the upstream cluster unless the `plan` says
otherwise. For `_bulk` requests the proxy records the document ids it saw
(after gzip decoding), so a test can count re-sent records.

    with FaultProxy(upstream_url) as proxy:
        proxy.plan = lambda request: Fault.status(429, retry_after="1") if request.number < 3 else None
        ... push to proxy.url ...
"""

import collections
import dataclasses
import gzip
import http.client
import http.server
import socket
import threading
import time
from urllib.parse import urlsplit

import orjson


@dataclasses.dataclass
class ProxyRequest:
    number: int
    method: str
    path: str
    headers: dict
    body: bytes             # decoded (gunzipped)
    ids: list               # _bulk document ids, in order
    in_flight: int = 0      # _bulk requests the proxy was handling when this one arrived, itself included


@dataclasses.dataclass
class Fault:
    """What to do instead of (or after) forwarding."""

    kind: str                       # status | reset | reset_after_forward | drop_answer | truncate_items | delay
    status: int = 0                 # | item_status | cut_body
    headers: dict = dataclasses.field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0
    limit: int = 0

    @classmethod
    def reply(cls, status: int, retry_after: str | None = None, body: bytes = b'{"error":"injected"}'):
        return cls("status", status, {"Retry-After": retry_after} if retry_after else {}, body)

    @classmethod
    def reset(cls, after_forward: bool = False):
        return cls("reset_after_forward" if after_forward else "reset")

    @classmethod
    def drop_answer(cls, seconds: float):
        """Forward (the cluster applies it) but answer nothing for `seconds`: a client timeout."""
        return cls("drop_answer", seconds=seconds)

    @classmethod
    def truncate_items(cls):
        return cls("truncate_items")

    @classmethod
    def delay(cls, seconds: float):
        return cls("delay", seconds=seconds)

    @classmethod
    def cut_body(cls, after: int):
        """Forward, announce the whole answer, send its first `after` bytes and close: a connection lost mid-body."""
        return cls("cut_body", limit=after)

    @classmethod
    def item_status(cls, status: int, every: int = 2):
        """Forward, then rewrite every `every`-th item of the answer to `status` (e.g. 429 rejections)."""
        return cls("item_status", status=status, seconds=every)


class FaultProxy:
    def __init__(self, upstream: str, plan=None):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.plan = plan or (lambda request: None)
        self.requests = []
        self._bulk_in_flight = 0
        self._connections = set()
        self._lock = threading.Lock()
        self._serve(0)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _serve(self, port: int) -> None:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        """Close the listening socket and every open connection, as a cluster that went down."""
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restart(self) -> None:
        """Listen again on the same port."""
        self._serve(self._server.server_address[1])
        self._thread.start()

    def bulk_requests(self) -> list:
        return [r for r in self.requests if r.path.split("?")[0].endswith("/_bulk")]

    def id_counts(self) -> collections.Counter:
        return collections.Counter(doc_id for r in self.bulk_requests() for doc_id in r.ids)

    def resent(self) -> int:
        """How many document sends were repeats of an id already sent."""
        return sum(count - 1 for count in self.id_counts().values())

    def _record(self, method, path, headers, raw) -> ProxyRequest:
        body = gzip.decompress(raw) if headers.get("Content-Encoding") == "gzip" and raw else raw
        bulk = path.split("?")[0].endswith("/_bulk")
        with self._lock:
            self._bulk_in_flight += bulk
            request = ProxyRequest(len(self.requests), method, path, headers, body, bulk_ids(body) if bulk else [],
                                   self._bulk_in_flight)
            self.requests.append(request)
        return request

    def _done(self, request: ProxyRequest) -> None:
        with self._lock:
            self._bulk_in_flight -= request.path.split("?")[0].endswith("/_bulk")

    def _handler_class(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with proxy._lock:
                    proxy._connections.add(self.connection)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = proxy._record(self.command, self.path, dict(self.headers), raw)
                try:
                    self._serve(request, raw)
                finally:
                    proxy._done(request)

            def _serve(self, request, raw):
                fault = proxy.plan(request)
                if fault and fault.kind == "delay":
                    time.sleep(fault.seconds)
                    fault = None
                if fault and fault.kind == "status":
                    return self._answer(fault.status, fault.headers, fault.body)
                if fault and fault.kind == "reset":
                    return self._reset()
                status, headers, body = proxy._forward(self.command, self.path, dict(self.headers), raw)
                if fault is None:
                    return self._answer(status, headers, body)
                if fault.kind == "reset_after_forward":
                    return self._reset()
                if fault.kind == "drop_answer":
                    time.sleep(fault.seconds)
                    return self._reset()
                if fault.kind == "truncate_items":
                    data = orjson.loads(body)
                    data["items"] = data.get("items", [])[:-1]
                    return self._answer(status, headers, orjson.dumps(data))
                if fault.kind == "item_status":
                    return self._answer(status, headers, rewrite_items(body, fault.status, int(fault.seconds)))
                if fault.kind == "cut_body":
                    self.close_connection = True
                    return self._answer(status, headers, body, send=fault.limit)
                raise ValueError(f"unknown fault {fault.kind}")

            def _answer(self, status, headers, body, send=None):
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection",
                                            "content-encoding"):
                        self.send_header(name, value)
                # A HEAD answer has no body but announces the length a GET would have (S3 sizes come from it).
                upstream_length = next((v for k, v in headers.items() if k.lower() == "content-length"), "0")
                self.send_header("Content-Length", upstream_length if self.command == "HEAD" else str(len(body)))
                self.end_headers()
                self.wfile.write(body[:send])

            def _reset(self):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.close_connection = True
                self.connection.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        return Handler

    def _forward(self, method, path, headers, raw):
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        try:
            # Ask for a plain answer, so faults can rewrite it and tests can read it.
            forwarded = {k: v for k, v in headers.items()
                         if k.lower() not in ("host", "connection", "accept-encoding", "expect")}
            connection.request(method, path, body=raw, headers=forwarded)
            reply = connection.getresponse()
            return reply.status, dict(reply.getheaders()), reply.read()
        finally:
            connection.close()


def bulk_ids(body: bytes) -> list:
    """Document ids of a _bulk NDJSON body, in order."""
    ids, lines, index = [], body.split(b"\n"), 0
    while index < len(lines):
        if not lines[index].strip():
            index += 1
            continue
        action = orjson.loads(lines[index])
        op, meta = next(iter(action.items()))
        ids.append(meta.get("_id"))
        index += 1 if op == "delete" else 2
    return ids


def rewrite_items(body: bytes, status: int, every: int) -> bytes:
    data = orjson.loads(body)
    for number, item in enumerate(data.get("items", [])):
        if number % every == 0:
            result = next(iter(item.values()))
            result["status"] = status
            result["error"] = {"type": "es_rejected_execution_exception", "reason": "injected rejection"}
    data["errors"] = True
    return orjson.dumps(data)
