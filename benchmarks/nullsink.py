"""A null sink: an HTTP server that answers every _bulk item with success, fast.

    python benchmarks/nullsink.py [--port N]      prints its URL, serves until killed

It counts lines instead of parsing sources (one action line plus one source
line per document), so it costs far less than any client it measures.
`GET /` answers like Elasticsearch (with `X-Elastic-Product`), so that
elasticsearch-py's product check passes. `GET /_sink` returns its counters
(requests, docs, body bytes on the wire, wall time of the first request) and
`POST /_sink/reset` zeroes them.
"""

import argparse
import http.server
import socketserver
import sys
import threading
import time
import zlib

import orjson

ROOT = orjson.dumps({"name": "nullsink", "cluster_name": "nullsink", "cluster_uuid": "nullsink",
                     "version": {"number": "9.0.0", "build_flavor": "default"}, "tagline": "You Know, for Search"})
PRODUCT = {"X-Elastic-Product": "Elasticsearch", "Content-Type": "application/json"}


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.requests = self.docs = self.bytes = 0
        self.first_request_at = None

    def seen(self):
        """A request has arrived (headers read): the moment a resume is timed to."""
        with self.lock:
            if self.first_request_at is None:
                self.first_request_at = time.time()

    def add(self, docs: int, nbytes: int):
        with self.lock:
            self.requests += 1
            self.docs += docs
            self.bytes += nbytes

    def as_json(self) -> bytes:
        with self.lock:
            return orjson.dumps({"requests": self.requests, "docs": self.docs, "bytes": self.bytes,
                                 "first_request_at": self.first_request_at})


COUNTERS = Counters()
_ANSWERS = {}


def bulk_answer(docs: int) -> bytes:
    """`{"errors":false,"items":[...]}` for `docs` successes, built once per size."""
    answer = _ANSWERS.get(docs)
    if answer is None:
        items = b",".join([b'{"index":{"status":201,"result":"created"}}'] * docs)
        answer = _ANSWERS[docs] = b'{"took":1,"errors":false,"items":[' + items + b"]}"
    return answer


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, body: bytes, headers=PRODUCT, status=200):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self):
        self._reply(b"")

    def do_GET(self):
        self._reply(COUNTERS.as_json() if self.path.startswith("/_sink") else ROOT)

    def do_PUT(self):
        if "_bulk" in self.path:  # elasticsearch-py sends _bulk with PUT
            return self.do_POST()
        self._read_body()
        self._reply(b'{"acknowledged":true}')

    def do_DELETE(self):
        self._reply(b'{"acknowledged":true}')

    def do_POST(self):
        if self.path.startswith("/_sink/reset"):
            self._read_body()
            COUNTERS.reset()
            return self._reply(b"{}")
        COUNTERS.seen()
        body = self._read_body()
        wire = len(body)
        if self.headers.get("Content-Encoding", "") == "gzip":
            body = zlib.decompress(body, 31)
        lines = body.count(b"\n") + (0 if body.endswith(b"\n") else 1)
        docs = lines // 2
        COUNTERS.add(docs, wire)
        self._reply(bulk_answer(docs))

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port [a free one]")
    args = parser.parse_args(argv)
    server = Server(("127.0.0.1", args.port), Handler)
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
