"""The retry-queue protocol (SPEC section 5).

An item carries everything needed to resend it without the input file. A
document has one item at most: its key is `<index>/<id>`, and putting a
newer version replaces an older one. Quarantined lines, which have no
usable id, are keyed by batch, file and line; they are always dead.

Taking items leases them: a leased item is invisible to other drainers
until it is acknowledged, failed or released, or until its lease expires
(the drainer was killed), when it is pending again. Ack, fail and release
only touch items still leased under the token they were taken with, so a
drainer whose lease expired cannot acknowledge what another one now holds,
and a newer version put meanwhile is never deleted by the ack of an older.
"""

import dataclasses
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

PENDING = "pending"
DEAD = "dead"
QUARANTINED = "quarantined"
REPAIR = "repair"           # queued by `verify --full --repair`: drain makes it win over edits made by hand
FIRST_RETRY_DELAY = 60.0
DEFAULT_LEASE_SECONDS = 300.0


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
    lease: str = ""               # the token of the take that holds it, "" when not leased
    version_type: str = "external"  # external_gte: may replace an equal version (a repeated id, a repair)

    @staticmethod
    def document_key(index: str, doc_id: str) -> str:
        return f"{index}/{doc_id}"

    @staticmethod
    def line_key(batch_id: str, input_file: str, line: int) -> str:
        return f"quarantine:{batch_id}:{input_file}:{line}"


# (batch_id, due, later, leased, dead, oldest created_at): one row of a backend's stats scan.
BATCH_FIELDS = ("due", "later", "leased", "dead")


def retry_delay(attempts: int, max_delay: float) -> float:
    """Seconds before the next attempt: 1 min, 2 min, 4 min... capped at `max_delay`."""
    return min(max_delay, FIRST_RETRY_DELAY * 2 ** max(0, min(attempts, 40)))


def new_lease_token() -> str:
    return uuid.uuid4().hex


def redact_url(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RetryQueue:
    """The contract every backend implements; fail() and release() are shared here.

    Backends implement put, dead_letter, take, _settle, requeue_dead,
    make_due, resolve, purge, _batch_rows, list and close.
    """

    max_attempts: int
    max_retry_delay: float

    def put(self, items: list[QueueItem]) -> None:
        """Add or replace items as pending (a lower version never replaces a higher one)."""
        raise NotImplementedError

    def dead_letter(self, items: list[QueueItem]) -> None:
        """Add or replace items as dead, with their reason in `last_error`."""
        raise NotImplementedError

    def take(self, limit: int, lease_seconds: float = DEFAULT_LEASE_SECONDS, batch_id: str | None = None,
             due_only: bool = True) -> list[QueueItem]:
        """Lease up to `limit` pending items, due ones first; `due_only=False` also takes later ones.

        Atomic: two takers never get the same item while its lease runs.
        Quarantined items are never taken.
        """
        raise NotImplementedError

    def ack(self, items: list[QueueItem]) -> int:
        """Remove items that reached the cluster; returns how many were still ours to remove."""
        return self._settle([(item, None) for item in items])

    def fail(self, items: list[QueueItem], permanent: bool = False) -> int:
        """Return leased items with `last_error` set: attempts + 1 and a later next attempt.

        An item is dead when `permanent` or after `max_attempts`. Returns how
        many were still ours.
        """
        moment = now()
        for item in items:
            item.attempts += 1
            item.next_attempt_at = moment + retry_delay(item.attempts, self.max_retry_delay)
            item.status = DEAD if permanent or item.attempts >= self.max_attempts else PENDING
        return self._settle([(item, item.status) for item in items])

    def release(self, items: list[QueueItem]) -> int:
        """Give leased items back unchanged (the drain stopped before sending them)."""
        return self._settle([(item, PENDING) for item in items])

    def _settle(self, changes: list[tuple[QueueItem, str | None]]) -> int:
        """Apply (item, new status or None for delete) to items still leased under item.lease."""
        raise NotImplementedError

    def requeue_dead(self, batch_id: str | None = None) -> int:
        """Make dead documents pending and due now, with attempts reset; quarantined lines stay dead."""
        raise NotImplementedError

    def make_due(self, batch_id: str | None = None) -> int:
        """Make pending items (not leased) due now; returns how many were moved forward.

        `drain --all` calls it once before taking, so that an item failed during
        the drain keeps its backoff instead of being taken again at once.
        """
        raise NotImplementedError

    def resolve(self, docs, conflict: bool = False) -> int:
        """Remove queued or dead items a write just made obsolete; returns how many.

        `docs` have index, doc_id and version: documents the cluster acknowledged
        (indexed, deleted, or, with `conflict`, answered 409: it holds that
        version or a newer one). An item of the same index and id with a version
        at most theirs can never change the cluster again; left queued, an older
        index item would bring back a document a newer delete removed, and a
        dead one would keep `status` in warning for good. Leased items go too:
        their holder's settle then finds nothing. A 409 leaves a repair of that
        very version (external_gte) queued: a repair exists because the version
        the cluster holds is not our content, and it is sent to win over it.

        An empty queue answers at once, which is the common case: a push
        resolves every document it sends. An item put just after that look is
        as if put just after the write: the cluster's external versions settle
        it when it is drained (409: current).
        """
        if self._empty():
            return 0
        rows = resolvable(docs, conflict)
        return self._resolve(rows) if rows else 0

    def _empty(self) -> bool:
        """The queue holds no item at all (pending, leased or dead)."""
        raise NotImplementedError

    def _resolve(self, rows: list[tuple[str, int, int]]) -> int:
        """Remove the items `rows` (from `resolvable`) make obsolete; returns how many."""
        raise NotImplementedError

    def purge(self, batch_id: str | None = None, reason: str | None = None,
              older_than: float | None = None) -> int:
        """Delete dead items (documents and quarantined lines) of a batch, whose last error contains
        `reason`, created more than `older_than` seconds ago (each filter optional); returns how many."""
        raise NotImplementedError

    def stats(self) -> dict:
        """Counts: pending (due now, later), leased, dead, oldest item age, by kind and per batch."""
        moment = now()
        rows, by_kind = self._batch_rows(moment)
        return summarize(rows, by_kind, moment)

    def _batch_rows(self, moment: float) -> tuple[list[tuple], dict]:
        """Rows shaped like BATCH_FIELDS (see above) and {kind: count}."""
        raise NotImplementedError

    def list(self, status: str | None = None, limit: int = 100, batch_id: str | None = None) -> list[QueueItem]:
        """Items, oldest first, optionally of one status and one batch."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections."""


def summarize(rows, by_kind: dict, moment: float) -> dict:
    """The stats report from per-batch rows. `pending` counts due, later and leased items."""
    batches = {}
    for batch_id, *counts, oldest in rows:
        entry = dict(zip(BATCH_FIELDS, (int(c or 0) for c in counts)))
        entry["pending"] = entry["due"] + entry["later"] + entry["leased"]
        entry["oldest_age_s"] = round(moment - oldest, 1) if oldest else None
        batches[batch_id] = entry
    totals = {name: sum(b[name] for b in batches.values()) for name in (*BATCH_FIELDS, PENDING)}
    ages = [b["oldest_age_s"] for b in batches.values() if b["oldest_age_s"] is not None]
    return {**totals, "oldest_age_s": max(ages) if ages else None, "by_kind": by_kind, "batches": batches}


def resolvable(docs, conflict: bool = False) -> list[tuple[str, int, int]]:
    """(item key, version, 1 when a repair of that version stays) of acknowledged documents with a version."""
    return [(QueueItem.document_key(doc.index, doc.doc_id), doc.version, int(conflict)) for doc in docs
            if doc.version is not None and doc.doc_id is not None]


def now() -> float:
    return time.time()
