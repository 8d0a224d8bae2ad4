"""A small JSON client for the read side of verification: GET /, _count, _search, _mget, PIT.

Uses the same credentials and TLS settings as the push; it never asks for
more than read privilege on the target index (GET / is optional).
"""

import orjson
import requests

from . import __version__
from .auth import authorization_header
from .errors import AuthError, PushAgentError
from .security import secure_session, tls_failure

CONNECT_TIMEOUT = 10


class ClusterRequestError(PushAgentError):
    """The cluster answered a verification request with an error."""

    def __init__(self, message, status=None, **kwargs):
        super().__init__(message, **kwargs)
        self.status = status


class ClusterClient:
    def __init__(self, config):
        self.base = config.url.rstrip("/")
        self.timeout = (CONNECT_TIMEOUT, config.timeout_seconds)
        self.url = config.url
        self._session = secure_session(config.ca_bundle)
        self._session.headers.update({"Content-Type": "application/json", "User-Agent": f"pushagent/{__version__}",
                                      **authorization_header(config)})

    def request(self, method: str, path: str, body=None, params=None) -> dict:
        """One JSON request; raises AuthError on 401/403 and ClusterRequestError on other errors."""
        data = orjson.dumps(body) if body is not None else None
        try:
            reply = self._session.request(method, self.base + path, data=data, params=params, timeout=self.timeout)
        except requests.exceptions.SSLError as error:
            message, hint = tls_failure(error, self.url)
            raise ClusterRequestError(message, hint=hint) from None
        except requests.RequestException as error:
            raise ClusterRequestError(f"{method} {path} failed: {type(error).__name__}",
                                      hint="check url and that the cluster answers (`pushagent doctor`)") from None
        if reply.status_code in (401, 403):
            raise AuthError(f"{method} {path} refused with HTTP {reply.status_code}: {reply.text[:200]}",
                            hint="verification needs read privilege on the index")
        if reply.status_code >= 300:
            raise ClusterRequestError(f"{method} {path}: HTTP {reply.status_code} {reply.text[:300]}",
                                      status=reply.status_code)
        return orjson.loads(reply.content) if reply.content else {}

    def info(self) -> dict:
        """Cluster name, version and distribution; {} when GET / is not allowed to this key."""
        try:
            data = self.request("GET", "/")
        except PushAgentError:
            return {}
        version = data.get("version", {})
        return {"name": data.get("cluster_name"), "version": version.get("number"),
                "distribution": version.get("distribution", "elasticsearch")}

    def close(self) -> None:
        self._session.close()
