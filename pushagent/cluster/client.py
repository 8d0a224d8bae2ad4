"""A small JSON client for the read side of verification: GET /, _count, _search, _mget, PIT.

Uses the same credentials and TLS settings as the push; it never asks for
more than read privilege on the target index (GET / is optional).
"""

import time

import backoff
import orjson
import requests

from pushagent import __version__
from pushagent.cluster.auth import authorization_header
from pushagent.cluster.tls import secure_session, tls_failure
from pushagent.cluster.transport import parse_retry_after
from pushagent.errors import AuthError, PushAgentError

CONNECT_TIMEOUT = 10
RETRY_STATUSES = frozenset({429, 502, 503, 504})


class ClusterRequestError(PushAgentError):
    """The cluster answered a verification request with an error."""

    def __init__(self, message, status=None, **kwargs):
        super().__init__(message, **kwargs)
        self.status = status


class _Retryable(Exception):
    def __init__(self, reason: str, status=None, retry_after=None):
        super().__init__(reason)
        self.reason, self.status, self.retry_after = reason, status, retry_after


class ReadClient:
    """The read side's contract: `request`, and what verification builds on it.

    ClusterClient speaks HTTP; the tests' in-memory cluster (tests/fakecluster.py) answers the same requests.
    """

    base = ""   # where the cluster is, for log lines

    def request(self, method: str, path: str, body=None, params=None) -> dict:
        """One JSON request, its answer as a dict; AuthError on 401/403, ClusterRequestError on other errors."""
        raise NotImplementedError

    def field_types(self, index: str, fields: list) -> dict:
        """{field: set of its types} in `index` for `fields` and their `.keyword` sub-fields (_field_caps needs
        only read privilege). A dynamically mapped string is text with a keyword sub-field."""
        names = ",".join(f"{field},{field}.keyword" for field in fields)
        caps = self.request("GET", f"/{index}/_field_caps", params={"fields": names})["fields"]
        return {name: set(types) for name, types in caps.items()}

    def info(self) -> dict:
        """Cluster name, version and distribution; {} when GET / is not allowed to this key."""
        try:
            data = self.request("GET", "/")
        except PushAgentError:
            return {}
        version = data.get("version", {})
        return {"name": data.get("cluster_name"), "version": version.get("number"),
                "distribution": version.get("distribution", "elasticsearch")}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Release what the client holds (nothing, unless a subclass says otherwise)."""


class ClusterClient(ReadClient):
    """The read client over HTTP, with the push's credentials and TLS settings."""

    def __init__(self, config):
        self.base = config.url.rstrip("/")
        self.timeout = (CONNECT_TIMEOUT, config.timeout_seconds)
        self.url = config.url
        self.max_retries, self.backoff = config.max_retries, config.retry_backoff_seconds
        self.max_backoff = config.max_backoff_seconds
        self._session = secure_session(config.ca_bundle)
        self._session.headers.update({"Content-Type": "application/json", "User-Agent": f"pushagent/{__version__}",
                                      **authorization_header(config)})

    def request(self, method: str, path: str, body=None, params=None) -> dict:
        """One JSON request; raises AuthError on 401/403 and ClusterRequestError on other errors.

        429, 502-504 and connection errors are retried like bulk requests
        (full jitter, Retry-After honoured, up to max_retries): a throttled
        key must not turn a good batch into a failed verification.
        """
        data = orjson.dumps(body) if body is not None else None
        for attempt in range(self.max_retries + 1):
            try:
                reply = self._send(method, path, data, params)
            except _Retryable as retry:
                if attempt == self.max_retries:
                    raise ClusterRequestError(f"{method} {path}: {retry.reason}", status=retry.status,
                                              hint="check that the cluster answers (`pushagent doctor`)") from None
                ceiling = min(self.max_backoff, self.backoff * 2 ** attempt)
                time.sleep(max(backoff.full_jitter(ceiling), min(retry.retry_after or 0, self.max_backoff)))
                continue
            return orjson.loads(reply.content) if reply.content else {}

    def _send(self, method: str, path: str, data, params) -> requests.Response:
        try:
            reply = self._session.request(method, self.base + path, data=data, params=params, timeout=self.timeout)
        except requests.exceptions.SSLError as error:
            message, hint = tls_failure(error, self.url)
            raise ClusterRequestError(message, hint=hint) from None
        except requests.RequestException as error:
            raise _Retryable(type(error).__name__) from None
        if reply.status_code in RETRY_STATUSES:
            raise _Retryable(f"HTTP {reply.status_code}", reply.status_code,
                             parse_retry_after(reply.headers.get("Retry-After")))
        if reply.status_code in (401, 403):
            raise AuthError(f"{method} {path} refused with HTTP {reply.status_code}: {reply.text[:200]}",
                            hint="verification needs read privilege on the index")
        if reply.status_code >= 300:
            raise ClusterRequestError(f"{method} {path}: HTTP {reply.status_code} {reply.text[:300]}",
                                      status=reply.status_code)
        return reply

    def close(self) -> None:
        self._session.close()


def keyword_field(types: dict, field: str) -> str | None:
    """`field` itself or its `.keyword` sub-field, whichever is a keyword (exact, with doc values)."""
    return next((name for name in (field, f"{field}.keyword") if "keyword" in types.get(name, ())), None)
