"""TLS: sessions that trust the configured CA bundle, and TLS failures explained in words a user can act on."""

import ssl
from urllib.parse import urlsplit

import requests

from pushagent.config import is_loopback


def insecure_warning(config) -> str | None:
    """The warning printed on every run with --insecure (None without it)."""
    if not config.insecure:
        return None
    host = urlsplit(config.url).hostname or ""
    if config.url.startswith("http://") and not is_loopback(host):
        return (f"--insecure: sending the API key and the data to {host} over plain http://, unencrypted; "
                "anyone on the network path can read and reuse the key")
    return "--insecure is set but not needed for this url; remove it"


# OpenSSL verify codes (X509_V_ERR_*) -> (what happened, what to do).
_VERIFY_CODES = {
    10: ("the certificate of {host} has expired",
         "the cluster operator must renew it; if it looks valid, check this machine's clock (date -u)"),
    9: ("the certificate of {host} is not valid yet",
        "check this machine's clock (date -u)"),
    18: ("the certificate of {host} is self-signed and not trusted",
         "set ca_bundle to a PEM file holding that certificate"),
    19: ("the certificate of {host} is signed by a CA this machine does not trust",
         "set ca_bundle to the PEM file of the CA that signed the cluster's certificate"),
    20: ("the certificate of {host} is signed by a CA this machine does not trust",
         "set ca_bundle to the PEM file of the CA that signed the cluster's certificate"),
    62: ("the certificate of {host} is not issued for that host name",
         "use in url the host name the certificate was issued for (ask the cluster operator)"),
}


def tls_failure(error: BaseException, url: str) -> tuple[str, str]:
    """(message, hint) for a failed TLS handshake with `url`, naming the host and the reason."""
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    cause = find_ssl_error(error)
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = cause.verify_message or cause.reason or str(cause)
        what, hint = _VERIFY_CODES.get(cause.verify_code, ("the certificate of {host} was refused",
                                                           "check ca_bundle and the host name in url"))
        return f"TLS: {what.format(host=host)} ({reason})", hint
    reason = (getattr(cause, "reason", None) or str(cause or error)).splitlines()[0][:200]
    return (f"TLS handshake with {host} failed ({reason})",
            "check that url is the cluster's https:// address and port; run `pushagent doctor`")


def find_ssl_error(error: BaseException) -> BaseException | None:
    """The ssl.SSLError inside the wrappers of requests and urllib3, if any."""
    seen, todo = set(), [error]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        linked = [*getattr(current, "args", ()), getattr(current, "reason", None), current.__cause__,
                  current.__context__]
        todo.extend(item for item in linked if isinstance(item, BaseException))
    return None


class _ContextAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, context: ssl.SSLContext):
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self._context
        return super().init_poolmanager(*args, **kwargs)


def trust_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The system's trusted CAs plus those of `ca_bundle`; verification and host names always checked."""
    return ssl.create_default_context(cafile=ca_bundle)


def secure_session(ca_bundle: str | None) -> requests.Session:
    """A Session that verifies TLS against `trust_context` and ignores proxies and .netrc from the environment."""
    session = requests.Session()
    session.trust_env = False  # never pick up a .netrc or proxy the user did not configure
    session.mount("https://", _ContextAdapter(trust_context(ca_bundle)))
    return session
