"""`pushagent doctor`: preflight checks that say what is wrong before a 10-hour job starts.

Each check has a name, a status (ok | warn | fail | skip) and a detail a user
can act on. Only `fail` makes the run unhealthy: `skip` means "not checkable
here", never a guess. No check ever puts a credential in its detail.
"""

import dataclasses
import email.utils
import fnmatch
import os
import shutil
import socket
import ssl
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import requests

from pushagent import __version__
from pushagent.cluster.auth import authorization_header, scheme_name
from pushagent.cluster.tls import find_ssl_error, secure_session, tls_failure, trust_context
from pushagent.errors import PushAgentError
from pushagent.ops.queue_view import counts_text
from pushagent.state.durability import read_mounts, redis_durability, sqlite_durability
from pushagent.state.retry_queue import open_queue
from pushagent.state.retry_queue.base import redact_url

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
TIMEOUT = 15
MIN_FREE_BYTES = 64 * 1024**2       # a checkpoint and a queue.db of dead letters fit easily
LOW_FREE_BYTES = 1024**3
MAX_CLOCK_SKEW = 30
CERT_EXPIRY_WARNING_DAYS = 14
NEEDED_PRIVILEGES = ("read",)
WRITE_PRIVILEGES = ("write", "index")     # either lets the agent index documents
RISKY_PRIVILEGES = ("delete", "manage")
NODE_INFO = "/_nodes/_local?filter_path=cluster_name,nodes.*.version,nodes.*.build_flavor"


@dataclasses.dataclass
class Check:
    name: str
    status: str
    detail: str


@dataclasses.dataclass
class _Root:
    """The answer to GET / : everything later checks need from it."""

    status: int = 0
    body: dict = dataclasses.field(default_factory=dict)
    date: str | None = None
    sent_at: float = 0.0
    latency: float = 0.0


def healthy(checks: list[Check]) -> bool:
    return all(check.status != FAIL for check in checks)


def as_json(checks: list[Check]) -> dict:
    return {"ok": healthy(checks), "checks": [dataclasses.asdict(check) for check in checks]}


class Doctor:
    """Runs every check once: `Doctor(config).run()`."""

    def __init__(self, config, environ=None):
        self.config = config
        self.environ = os.environ if environ is None else environ
        self.base = config.url.rstrip("/")
        self.session = secure_session(config.ca_bundle)
        self.session.headers["User-Agent"] = f"pushagent/{__version__} doctor"
        self.distribution = None
        self.credentials_refused = False   # the key file was refused: requests go without credentials

    def run(self) -> list[Check]:
        checks = [self._credentials(), self._tls()]
        root, reach = self._reachability()
        checks.append(reach)
        if reach.status == FAIL:
            checks += _skipped(("authentication", "cluster", "clock", "privileges", "index"),
                               "the cluster is not reachable")
        else:
            auth = self._authentication(root)
            checks += [auth, self._cluster(root), self._clock(root)]
            checks += (_skipped(("privileges", "index"), "authentication failed") if auth.status == FAIL
                       else self._index_checks())
        checks += [self._queue(), self._state_dir(), self._durability()]
        return checks

    # -- connection -----------------------------------------------------------------------------------

    def _credentials(self) -> Check:
        try:
            self.session.headers.update(authorization_header(self.config, self.environ))
        except PushAgentError as error:
            self.credentials_refused = True
            return Check("credentials", FAIL, str(error))
        scheme = scheme_name(self.config, self.environ)
        if scheme == "none":
            return Check("credentials", WARN, "no credentials configured: set api_key_file or PUSHAGENT_API_KEY")
        return Check("credentials", OK, scheme)

    def _tls(self) -> Check:
        parts = urlsplit(self.config.url)
        if parts.scheme != "https":
            status = WARN if self.config.insecure else OK
            return Check("tls", status, f"plain http:// to {parts.hostname}: no TLS (allowed for loopback only)")
        try:
            return Check("tls", *self._handshake(parts.hostname, parts.port or 443))
        except (ssl.SSLError, OSError) as error:
            if find_ssl_error(error) is None:
                return Check("tls", FAIL, f"cannot connect to {parts.hostname}:{parts.port or 443}: {error}")
            message, hint = tls_failure(error, self.config.url)
            return Check("tls", FAIL, f"{message}; {hint}")

    def _handshake(self, host: str, port: int) -> tuple[str, str]:
        context = trust_context(self.config.ca_bundle)
        with socket.create_connection((host, port), timeout=TIMEOUT) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                cert, version = tls.getpeercert(), tls.version()
        subject = ", ".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
        expires = ssl.cert_time_to_seconds(cert["notAfter"])
        days = (expires - time.time()) / 86400
        detail = (f"{version}, certificate {subject or '(no subject)'}, expires "
                  f"{datetime.fromtimestamp(expires, timezone.utc):%Y-%m-%d} ({days:.0f} days)")
        if self.config.ca_bundle:
            detail += f", trusted through ca_bundle {self.config.ca_bundle}"
        return (WARN if days < CERT_EXPIRY_WARNING_DAYS else OK), detail

    def _reachability(self) -> tuple[_Root, Check]:
        root = _Root(sent_at=time.time())
        started = time.monotonic()
        try:
            reply = self.session.get(self.base + "/", timeout=TIMEOUT)
        except requests.exceptions.SSLError:
            return root, Check("reachability", FAIL, f"no answer from {self.base}: the TLS handshake failed "
                                                     "(see the tls check)")
        except requests.RequestException as error:
            reason = str(error).splitlines()[0][:200]
            return root, Check("reachability", FAIL, f"cannot reach {self.base}: {type(error).__name__}: {reason}")
        root.latency = time.monotonic() - started
        root.status, root.date = reply.status_code, reply.headers.get("Date")
        detail = f"{self.base} answered HTTP {reply.status_code} in {root.latency * 1000:.0f} ms"
        if reply.status_code == 200:
            root.body = _json_or_empty(reply)
        elif reply.status_code not in (401, 403):
            detail += self._root_from_node_info(root, reply)
        return root, Check("reachability", OK, detail)

    def _root_from_node_info(self, root: _Root, first) -> str:
        """GET / is not served (the Elasticsearch 8 integ-test zip answers 405): ask the local node's info instead.

        Its answer stands in for GET / in the authentication and cluster checks. Only Elasticsearch sends
        X-elastic-product and build_flavor, so the distribution is known, not guessed.
        """
        reply = self._get(NODE_INFO)
        if reply is None:
            return " (GET / is not served)"
        root.status, root.date = reply.status_code, root.date or reply.headers.get("Date")
        if reply.status_code == 200:
            data = _json_or_empty(reply)
            node = next(iter((data.get("nodes") or {}).values()), {})
            elastic = "X-elastic-product" in first.headers or "build_flavor" in node
            root.body = {"cluster_name": data.get("cluster_name"), "version": {
                "number": node.get("version"), "distribution": "elasticsearch" if elastic else "opensearch"}}
        return f" (GET / is not served; GET {NODE_INFO.split('?')[0]} answered HTTP {reply.status_code})"

    def _authentication(self, root: _Root) -> Check:
        if root.status == 401:
            return Check("authentication", FAIL, "the cluster refused the credentials (HTTP 401): the key is "
                         "missing, wrong, expired or revoked; check api_key_file or PUSHAGENT_API_KEY")
        if root.status == 403:
            return Check("authentication", WARN, "credentials accepted but the key may not read cluster "
                         "information (HTTP 403); the privilege checks below still apply")
        if root.status != 200:
            return Check("authentication", FAIL, f"unexpected HTTP {root.status} from {self.base}/: "
                         "is url the cluster's base URL?")
        scheme = scheme_name(self.config, self.environ)
        if self.credentials_refused:
            return Check("authentication", SKIP, "no credentials were sent (see the credentials check); the "
                                                 "cluster answers requests without them")
        if scheme == "none":
            return Check("authentication", WARN, "the cluster answers without credentials: is it really the "
                                                 "secured cluster you mean?")
        return Check("authentication", OK, f"accepted ({scheme})")

    def _cluster(self, root: _Root) -> Check:
        version = root.body.get("version") or {}
        if not version:
            return Check("cluster", SKIP, f"no cluster information (HTTP {root.status})")
        self.distribution = version.get("distribution", "elasticsearch")
        return Check("cluster", OK, f"{root.body.get('cluster_name')}: {self.distribution} "
                                    f"{version.get('number')}")

    def _clock(self, root: _Root) -> Check:
        try:
            server = email.utils.parsedate_to_datetime(root.date).timestamp()
            skew = (root.sent_at + root.latency / 2) - server
        except (TypeError, ValueError):
            # Elasticsearch and OpenSearch send no Date header themselves (a proxy in front usually does):
            # the cluster's own clock is in its stats.
            skew = self._stats_clock_skew()
        if skew is None:
            return Check("clock", SKIP, "the cluster sent no Date header and this key may not read "
                                        "/_cluster/stats: the clock was not compared")
        detail = f"this machine is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the cluster"
        if abs(skew) > MAX_CLOCK_SKEW:
            return Check("clock", WARN, detail + ": fix NTP, timestamps and certificate checks depend on it")
        return Check("clock", OK, detail)

    def _stats_clock_skew(self) -> float | None:
        """This machine's clock minus the cluster's, from the timestamp of /_cluster/stats; None if unreadable."""
        sent_at, started = time.time(), time.monotonic()
        reply = self._get("/_cluster/stats?filter_path=timestamp")
        latency = time.monotonic() - started
        stamp = _json_or_empty(reply).get("timestamp") if reply is not None and reply.status_code == 200 else None
        if not isinstance(stamp, (int, float)):
            return None
        return (sent_at + latency / 2) - stamp / 1000

    # -- indices --------------------------------------------------------------------------------------

    def _index_checks(self) -> list[Check]:
        indices = sorted(self.config.allowed)
        if not indices:
            return [Check("index", FAIL, "no target index: set index or allowed_indices")]
        privileges = self._privileges(indices)
        if "*" in privileges:
            return [privileges["*"], *(self._index_exists(index) for index in indices)]
        return [check for index in indices for check in (privileges[index], self._index_exists(index))]

    def _privileges(self, indices: list) -> dict:
        """index -> Check, or {'*': Check} when privileges are not checkable."""
        if self.distribution == "opensearch":
            return {"*": self._opensearch_privileges()}
        missing = self._security_api_missing()
        if missing:
            return {"*": missing}
        body = {"index": [{"names": indices,
                           "privileges": [*NEEDED_PRIVILEGES, *WRITE_PRIVILEGES, *RISKY_PRIVILEGES]}]}
        try:
            reply = self.session.post(self.base + "/_security/user/_has_privileges", json=body, timeout=TIMEOUT)
        except requests.RequestException as error:
            return {"*": Check("privileges", SKIP, f"not checkable: {type(error).__name__}")}
        if reply.status_code != 200:
            return {"*": Check("privileges", SKIP, f"not checkable: _has_privileges answered HTTP "
                                                   f"{reply.status_code} (security disabled?)")}
        granted = _json_or_empty(reply).get("index", {})
        return {index: _judge_privileges(index, granted.get(index, {})) for index in indices}

    def _security_api_missing(self) -> Check | None:
        """A skip when the cluster has no security API; None when _has_privileges may be asked.

        Without security, Elasticsearch 7 routes POST /_security/user/_has_privileges as a typed index
        request into an index named `_security` and logs a CRITICAL deprecation; GET /_security/_authenticate
        (typeless, allowed to every authenticated user) only gets a 405 or 400 there.
        """
        reply = self._get("/_security/_authenticate")
        if reply is None:
            return Check("privileges", SKIP, "not checkable: GET /_security/_authenticate had no answer")
        if reply.status_code != 200:
            return Check("privileges", SKIP, f"not checkable: _security/_authenticate answered HTTP "
                                             f"{reply.status_code} (security disabled?)")
        return None

    def _opensearch_privileges(self) -> Check:
        try:
            reply = self.session.get(self.base + "/_plugins/_security/authinfo", timeout=TIMEOUT)
        except requests.RequestException as error:
            return Check("privileges", SKIP, f"not checkable: {type(error).__name__}")
        if reply.status_code != 200:
            return Check("privileges", SKIP, "not checkable: the cluster has no security plugin "
                                             "(every client may read and write)")
        info = _json_or_empty(reply)
        return Check("privileges", SKIP, "not checkable: the OpenSearch security plugin has no privilege "
                     f"check for a key; user {info.get('user_name')!r} has roles {info.get('roles', [])}; "
                     "a missing privilege stops the push with exit 4")

    def _index_exists(self, index: str) -> Check:
        name = f"index:{index}"
        reply = self._get(f"/{index}", head=True)
        if reply is None or reply.status_code not in (200, 404):
            status = reply.status_code if reply is not None else "no answer"
            return Check(name, SKIP, f"not checkable: HEAD /{index} answered {status}")
        if reply.status_code == 200:
            return Check(name, OK, "exists")
        setting = self._auto_create_setting()
        if setting is None:
            return Check(name, WARN, "does not exist; whether it may be auto-created is not checkable")
        if auto_create_allows(setting, index):
            return Check(name, OK, f"does not exist yet; it will be created on the first write "
                                   f"(action.auto_create_index: {setting})")
        return Check(name, FAIL, f"does not exist and action.auto_create_index ({setting}) forbids creating it: "
                                 "ask the cluster operator to create it")

    def _auto_create_setting(self) -> str | None:
        reply = self._get("/_cluster/settings?include_defaults=true&flat_settings=true")
        if reply is None or reply.status_code != 200:
            return None
        data = _json_or_empty(reply)
        for scope in ("transient", "persistent", "defaults"):
            value = data.get(scope, {}).get("action.auto_create_index")
            if value is not None:
                return str(value).lower() if isinstance(value, bool) else str(value)
        return "true"

    def _get(self, path: str, head: bool = False):
        try:
            method = self.session.head if head else self.session.get
            return method(self.base + path, timeout=TIMEOUT)
        except requests.RequestException:
            return None

    # -- local ----------------------------------------------------------------------------------------

    def _queue(self) -> Check:
        url = self.config.resolved_queue_url
        shown = redact_url(url)
        try:
            queue = open_queue(url, self.config.max_attempts, self.config.max_retry_delay)
            try:
                stats = queue.stats()
            finally:
                queue.close()
        except Exception as error:  # any backend failure is this check's answer, not a crash
            return Check("queue", FAIL, f"{shown}: {type(error).__name__}: {error}")
        return Check("queue", OK, f"{shown} reachable: {_summary(stats)}")

    def _durability(self) -> Check:
        """Warns when a put could be lost: SQLite on a network file system, Redis without persistence."""
        url = self.config.resolved_queue_url
        try:
            if url.startswith("sqlite:///"):
                status, detail = sqlite_durability(Path(url[len("sqlite://"):]), read_mounts())
            else:
                queue = open_queue(url, self.config.max_attempts, self.config.max_retry_delay)
                try:
                    status, detail = redis_durability(queue.persistence())
                finally:
                    queue.close()
        except Exception as error:  # the queue check reports an unusable queue; here it is only not checkable
            return Check("durability", SKIP, f"not checkable: {type(error).__name__}: {error}")
        return Check("durability", status, detail)

    def _state_dir(self) -> Check:
        path = self.config.state_path
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-") as probe:
                probe.write(b"x")
                probe.flush()
                os.fsync(probe.fileno())
            free = shutil.disk_usage(path).free
        except OSError as error:
            return Check("state_dir", FAIL, f"{path} is not writable: {error.strerror or error}")
        detail = f"{path} writable, {free / 1024**3:.1f} GiB free"
        if free < MIN_FREE_BYTES:
            return Check("state_dir", FAIL, detail + ": too little room for checkpoints and the queue")
        return Check("state_dir", WARN if free < LOW_FREE_BYTES else OK, detail)


def _skipped(names, reason: str) -> list[Check]:
    return [Check(name, SKIP, reason) for name in names]


def _judge_privileges(index: str, granted: dict) -> Check:
    name = f"privileges:{index}"
    missing = [p for p in NEEDED_PRIVILEGES if not granted.get(p)]
    if not any(granted.get(p) for p in WRITE_PRIVILEGES):
        missing.append("write")
    if missing:
        return Check(name, FAIL, f"the key lacks {' and '.join(missing)} on {index}: ask the cluster operator "
                                 "for read and write (or index) on it")
    risky = [p for p in RISKY_PRIVILEGES if granted.get(p)]
    if risky:
        return Check(name, WARN, f"read and write granted, but the key can also {' and '.join(risky)}: "
                                 "a key with read and index only is safer")
    return Check(name, OK, "read and write granted; no delete or manage")


def auto_create_allows(setting: str, index: str) -> bool:
    """Elasticsearch's action.auto_create_index: true, false, or +/- patterns, first match wins."""
    if setting.strip().lower() in ("true", ""):
        return True
    if setting.strip().lower() == "false":
        return False
    for pattern in (part.strip() for part in setting.split(",")):
        allow = not pattern.startswith("-")
        if fnmatch.fnmatchcase(index, pattern.lstrip("+-")):
            return allow
    return False


def _json_or_empty(reply) -> dict:
    try:
        data = reply.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _summary(stats: dict) -> str:
    return counts_text(stats)
