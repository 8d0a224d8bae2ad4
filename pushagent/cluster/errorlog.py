"""One WARNING the first time each kind of error appears in a run, so a night's log says why.

Without it a blocked push prints progress lines only, and the reason
(`429 cluster_block_exception`) shows up in `queue list` the next morning.
A kind is the scope (whole request or item), the HTTP status and the error
type; the line gives the first reason and how many were seen so far.
Messages carry the cluster's answer only, never a request header.
"""

import logging
import threading

import orjson

log = logging.getLogger("pushagent.errors")
MAX_REASON = 300


class ErrorDigest:
    """Counts errors by kind; logs the first of each kind."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = {}

    def seen(self, scope: str, status, error_type: str, reason: str, count: int = 1) -> None:
        """Count `count` errors of one kind; warn when the kind is new to this run."""
        kind = (scope, str(status), error_type)
        with self._lock:
            first = kind not in self.counts
            self.counts[kind] = self.counts.get(kind, 0) + count
            total = self.counts[kind]
        if first:
            what = "bulk request failed" if scope == "request" else "bulk items refused"
            log.warning("%s: %s %s: %s (first time in this run; %d so far)", what, status, error_type,
                        reason[:MAX_REASON], total)

    def as_dict(self) -> dict:
        """{"<scope> <status> <type>": count}, for reports."""
        with self._lock:
            return {" ".join(kind): count for kind, count in sorted(self.counts.items())}


def error_of_body(text: str) -> tuple[str, str]:
    """(type, reason) of an Elasticsearch/OpenSearch error body, or ("error", the text)."""
    try:
        error = orjson.loads(text).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return "error", text.strip()
    if isinstance(error, dict):
        return str(error.get("type", "error")), str(error.get("reason", ""))
    return "error", str(error or text).strip()
