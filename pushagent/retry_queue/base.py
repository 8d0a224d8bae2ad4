"""The retry-queue protocol (SPEC section 5).

An item carries everything needed to resend it without the input file. A
document has one item at most: its key is `<index>/<id>`, and putting a
newer version replaces an older one. Quarantined lines, which have no
usable id, are keyed by batch, file and line.
"""

import dataclasses
import time
from typing import Protocol

PENDING = "pending"
DEAD = "dead"
FIRST_RETRY_DELAY = 60.0


@dataclasses.dataclass
class QueueItem:
    key: str
    batch_id: str
    index: str | None
    doc_id: str | None
    version: int | None
    op: str | None
    source: bytes | None          # the NDJSON source line as sent (stamped), or the raw line
    input_file: str
    line: int
    kind: str                     # retryable | permanent | quarantined
    last_error: str = ""
    attempts: int = 0
    next_attempt_at: float = 0.0
    status: str = PENDING

    @staticmethod
    def document_key(index: str, doc_id: str) -> str:
        return f"{index}/{doc_id}"

    @staticmethod
    def line_key(batch_id: str, input_file: str, line: int) -> str:
        return f"quarantine:{batch_id}:{input_file}:{line}"


def retry_delay(attempts: int, max_delay: float) -> float:
    """Seconds before the next attempt: 1 min, 2 min, 4 min... capped at `max_delay`."""
    return min(max_delay, FIRST_RETRY_DELAY * 2 ** max(0, attempts))


class RetryQueue(Protocol):
    def put(self, items: list[QueueItem]) -> None:
        """Add or replace items as pending (a lower version never replaces a higher one)."""

    def dead_letter(self, items: list[QueueItem]) -> None:
        """Add or replace items as dead, with their reason in `last_error`."""

    def stats(self) -> dict:
        """Counts by status and kind."""

    def list(self, status: str | None = None, limit: int = 100) -> list[QueueItem]:
        """Items, oldest first, optionally of one status."""

    def close(self) -> None:
        """Release connections."""


def open_queue(url: str, max_attempts: int = 8, max_retry_delay: float = 6 * 3600) -> RetryQueue:
    """The backend named by `url`: sqlite:///path or redis://host:port/db."""
    from ..errors import ConfigError
    if url.startswith("sqlite:///"):
        from .sqlite_backend import SqliteQueue
        return SqliteQueue(url[len("sqlite://"):], max_attempts, max_retry_delay)
    raise ConfigError(f"unsupported queue_url {url!r}: expected sqlite:///path")


def now() -> float:
    return time.time()
