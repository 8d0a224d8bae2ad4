"""SQLite retry queue: one file in WAL mode, every write in one BEGIN IMMEDIATE transaction.

BEGIN IMMEDIATE takes the write lock before the select of a take, so two
drainers (threads or processes) never lease the same row.
"""

import contextlib
import fcntl
import sqlite3
import threading
from pathlib import Path

from pushagent.errors import QueueError
from pushagent.state.retry_queue.base import (DEAD, PENDING, QUARANTINED, QueueItem, RetryQueue, new_lease_token, now,
                                              retry_delay)

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    index_name TEXT,
    doc_id TEXT,
    version INTEGER,
    op TEXT,
    source BLOB,
    input_file TEXT,
    line INTEGER,
    kind TEXT NOT NULL,
    last_error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_due ON items (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS items_batch ON items (batch_id);
"""
COLUMNS = ("key", "batch_id", "index_name", "doc_id", "version", "op", "source", "input_file", "line",
           "kind", "last_error", "attempts", "next_attempt_at", "status", "version_type")
# A newer version of a document replaces its queued item (and cancels its lease); an older one never does.
UPSERT = f"""
INSERT INTO items ({", ".join(COLUMNS)}, created_at) VALUES ({", ".join("?" * (len(COLUMNS) + 1))})
ON CONFLICT(key) DO UPDATE SET
  {", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])}, lease_until = 0, lease_token = ''
WHERE excluded.version IS NULL OR items.version IS NULL OR excluded.version >= items.version
"""
TAKE = f"""
UPDATE items SET lease_until = ?, lease_token = ?
WHERE key IN (SELECT key FROM items WHERE status = 'pending' AND kind != '{QUARANTINED}' AND lease_until <= ?
              AND next_attempt_at <= ? AND (? IS NULL OR batch_id = ?) ORDER BY next_attempt_at LIMIT ?)
RETURNING {", ".join(COLUMNS)}, lease_token
"""
SETTLE = "UPDATE items SET status = ?, attempts = ?, next_attempt_at = ?, last_error = ?, lease_until = 0, " \
         "lease_token = '' WHERE key = ? AND lease_token = ? AND lease_token != ''"
ACK = "DELETE FROM items WHERE key = ? AND lease_token = ? AND lease_token != ''"
MAKE_DUE = f"""
UPDATE items SET next_attempt_at = :now
WHERE status = 'pending' AND kind != '{QUARANTINED}' AND lease_until <= :now AND next_attempt_at > :now
  AND (:batch IS NULL OR batch_id = :batch)
"""
RESOLVE = ("DELETE FROM items WHERE key = ?1 AND version IS NOT NULL AND version <= ?2 "
           "AND NOT (?3 AND version = ?2 AND version_type = 'external_gte')")
PURGE = """
DELETE FROM items WHERE status = 'dead' AND (:batch IS NULL OR batch_id = :batch)
  AND (:reason IS NULL OR instr(last_error, :reason) > 0) AND (:before IS NULL OR created_at < :before)
"""
BATCH_ROWS = """
SELECT batch_id,
  SUM(status = 'pending' AND lease_until <= :now AND next_attempt_at <= :now),
  SUM(status = 'pending' AND lease_until <= :now AND next_attempt_at > :now),
  SUM(status = 'pending' AND lease_until > :now),
  SUM(status = 'dead'),
  MIN(created_at)
FROM items GROUP BY batch_id ORDER BY batch_id
"""


class SqliteQueue(RetryQueue):
    def __init__(self, path: str, max_attempts: int = 8, max_retry_delay: float = 6 * 3600):
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.max_retry_delay = max_retry_delay
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._opening_lock():
                self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False,
                                           isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                # FULL: a put is on disk when it returns, before the checkpoint that passes its records
                # is written. NORMAL in WAL mode can lose the last transactions to a power cut or node crash.
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(SCHEMA)
                self._add_columns()
        except (sqlite3.Error, OSError) as error:
            raise QueueError(f"cannot open the retry queue {self.path}: {error}") from None

    @contextlib.contextmanager
    def _opening_lock(self):
        """Processes opening the queue take turns, e.g. the tasks of an array starting together.

        Opening a new queue switches it to WAL and adds columns. SQLite answers
        a second process doing the same with "database is locked" at once,
        without waiting for its busy timeout, or lets both add a column.
        """
        with open(self.path.with_name(f"{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _add_columns(self) -> None:
        # Queues written by earlier versions lack the later columns; adding them keeps their items.
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(items)")}
        for name, default in (("lease_token", "''"), ("version_type", "'external'")):
            if name not in columns:
                self._db.execute(f"ALTER TABLE items ADD COLUMN {name} TEXT NOT NULL DEFAULT {default}")

    def _transaction(self, work):
        """Run work(db) inside BEGIN IMMEDIATE ... COMMIT; errors become QueueError."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                result = work(self._db)
                self._db.execute("COMMIT")
                return result
            except sqlite3.Error as error:
                self._db.execute("ROLLBACK") if self._db.in_transaction else None
                raise QueueError(f"retry queue {self.path}: {error}",
                                 hint="check free space and permissions of state_dir") from None

    def _write(self, sql: str, rows) -> int:
        return self._transaction(lambda db: db.executemany(sql, rows).rowcount)

    def put(self, items) -> None:
        moment = now()
        for item in items:
            item.status = PENDING
            item.next_attempt_at = item.next_attempt_at or moment + retry_delay(item.attempts, self.max_retry_delay)
        self._write(UPSERT, [self._row(item, moment) for item in items])

    def dead_letter(self, items) -> None:
        moment = now()
        for item in items:
            item.status = DEAD
        self._write(UPSERT, [self._row(item, moment) for item in items])

    @staticmethod
    def _row(item: QueueItem, moment: float) -> tuple:
        return (item.key, item.batch_id, item.index, item.doc_id, item.version, item.op, item.source,
                item.input_file, item.line, item.kind, item.last_error, item.attempts, item.next_attempt_at,
                item.status, item.version_type, moment)

    def take(self, limit, lease_seconds=300.0, batch_id=None, due_only=True) -> list:
        moment = now()
        horizon = moment if due_only else float("inf")
        params = (moment + lease_seconds, new_lease_token(), moment, horizon, batch_id, batch_id, limit)
        rows = self._transaction(lambda db: db.execute(TAKE, params).fetchall())
        items = [self._item(row[:-1], lease=row[-1]) for row in rows]
        return sorted(items, key=lambda item: item.next_attempt_at)

    def _settle(self, changes) -> int:
        acks = [(item.key, item.lease) for item, status in changes if status is None]
        updates = [(status, item.attempts, item.next_attempt_at, item.last_error, item.key, item.lease)
                   for item, status in changes if status is not None]

        def work(db):
            done = db.executemany(ACK, acks).rowcount if acks else 0
            return done + (db.executemany(SETTLE, updates).rowcount if updates else 0)
        return self._transaction(work)

    def requeue_dead(self, batch_id=None) -> int:
        sql = ("UPDATE items SET status = 'pending', attempts = 0, next_attempt_at = ?, lease_until = 0 "
               f"WHERE status = 'dead' AND kind != '{QUARANTINED}' AND (? IS NULL OR batch_id = ?)")
        return self._transaction(lambda db: db.execute(sql, (now(), batch_id, batch_id)).rowcount)

    def make_due(self, batch_id=None) -> int:
        params = {"now": now(), "batch": batch_id}
        return self._transaction(lambda db: db.execute(MAKE_DUE, params).rowcount)

    def _empty(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT NOT EXISTS (SELECT 1 FROM items)").fetchone()[0] == 1

    def _resolve(self, rows) -> int:
        return self._write(RESOLVE, rows)

    def purge(self, batch_id=None, reason=None, older_than=None) -> int:
        params = {"batch": batch_id, "reason": reason, "before": None if older_than is None else now() - older_than}
        return self._transaction(lambda db: db.execute(PURGE, params).rowcount)

    def _batch_rows(self, moment):
        with self._lock:
            rows = self._db.execute(BATCH_ROWS, {"now": moment}).fetchall()
            kinds = self._db.execute("SELECT kind, COUNT(*) FROM items GROUP BY kind").fetchall()
        return rows, dict(kinds)

    def list(self, status=None, limit=100, batch_id=None) -> list:
        sql = (f"SELECT {', '.join(COLUMNS)} FROM items WHERE (? IS NULL OR status = ?) "
               "AND (? IS NULL OR batch_id = ?) ORDER BY created_at, rowid LIMIT ?")
        with self._lock:
            rows = self._db.execute(sql, (status, status, batch_id, batch_id, limit)).fetchall()
        return [self._item(row) for row in rows]

    @staticmethod
    def _item(row, lease: str = "") -> QueueItem:
        values = dict(zip(COLUMNS, row))
        values["index"] = values.pop("index_name")
        return QueueItem(**values, lease=lease)

    def close(self) -> None:
        with self._lock:
            self._db.close()
