"""Logging: text for people, `--log-format json` for machines (one object per line), secrets redacted.

Every line goes through `redact`, so an Authorization value or the
PUSHAGENT_API_KEY secret cannot reach a log even through an exception text.
"""

import dataclasses
import json
import logging
import os
import re
import sys
import time

from pushagent.errors import ChunkAborted
from pushagent.redact import redact as redact_registered

TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# Attributes every LogRecord has: anything else came in through `extra=` and is a field.
_RECORD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_CREDENTIAL = re.compile(r"\b(ApiKey|Basic|Bearer)\s+[A-Za-z0-9+/=._:-]+", re.IGNORECASE)
MIN_SECRET_LENGTH = 6  # shorter values would redact ordinary words


@dataclasses.dataclass
class LogSettings:
    fmt: str = "text"
    level: int = logging.INFO


current = LogSettings()


def redact(text: str, environ=None) -> str:
    """`text` with credentials replaced by ***."""
    environ = os.environ if environ is None else environ
    text = redact_registered(text)  # keys read from api_key_file, basic-auth passwords, their base64 forms
    text = _CREDENTIAL.sub(lambda match: f"{match.group(1)} ***", text)
    secret = (environ.get("PUSHAGENT_API_KEY") or "").strip()
    if len(secret) >= MIN_SECRET_LENGTH:
        text = text.replace(secret, "***")
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        data = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        data.update({k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(data, default=str))


def setup_logging(fmt: str = "text", verbose: int = 0, quiet: bool = False, stream=None) -> LogSettings:
    """Configure the `pushagent` logger on stderr; -v shows debug lines, -q only warnings and errors."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    logger = logging.getLogger("pushagent")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    current.fmt, current.level = fmt, level
    return current


class ChunkLog:
    """A push observer logging one line per resolved chunk: batch id, chunk number, status, latency.

    At info level for JSON logs, which machines filter; at debug level for
    text, where the periodic progress line is what people read.
    """

    def __init__(self, level: int = logging.DEBUG):
        self.level = level
        self.log = logging.getLogger("pushagent.chunks")

    def chunk_resolved(self, run, chunk, ledger, error) -> None:
        status = chunk_status(ledger, error)
        fields = {"event": "chunk", "batch_id": run.batch_id, "chunk": chunk.seq, "status": status,
                  "docs": chunk.records, "latency_s": round(getattr(chunk, "seconds", 0.0), 3)}
        if ledger is not None:
            fields.update({k: v for k, v in ledger.as_dict().items() if k != "read"})
        if error is not None:
            fields["error"] = str(error)
        self.log.log(self.level, "chunk %s: %s, %s records, %.3f s", chunk.seq, status, chunk.records,
                     fields["latency_s"], extra=fields)


def chunk_status(ledger, error) -> str:
    """ok: all indexed or current; partial: some queued, dead or quarantined; aborted or failed: unresolved."""
    if isinstance(error, ChunkAborted):
        return "aborted"
    if error is not None or ledger is None:
        return "failed"
    return "partial" if ledger.unfinished else "ok"
