"""Keep every secret out of every output: the registry of secrets and `redact`.

`register_secret` is called with each credential read (the API key, S3
keys); the log formatters (ops/logs.py) and the CLI's error printer pass
their text through `redact`, a second line of defence behind never
formatting a secret at all. Every layer may use it, so it sits at the top.
"""

import base64
import binascii
import threading

REDACTED = "[REDACTED]"


_secrets: set[str] = set()


_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Remember `value` and its base64 forms so `redact` can hide them."""
    forms = {value, base64.b64encode(value.encode()).decode()}
    try:
        decoded = base64.b64decode(value, validate=True).decode()
        if decoded.isprintable() and len(decoded) >= 8:
            forms.add(decoded)
            forms.update(part for part in decoded.split(":") if len(part) >= 8)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    with _lock:
        _secrets.update(form for form in forms if len(form) >= 4)


def redact(text: str) -> str:
    """`text` with every registered secret replaced by [REDACTED]."""
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text
