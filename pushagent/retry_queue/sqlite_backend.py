"""SQLite retry queue: one file in WAL mode, every write in one transaction."""

import sqlite3
import threading
from pathlib import Path

from ..errors import QueueError
from .base import DEAD, PENDING, QueueItem, now, retry_delay

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
           "kind", "last_error", "attempts", "next_attempt_at", "status")
# A newer version of a document replaces its queued item; an older one never does.
UPSERT = f"""
INSERT INTO items ({", ".join(COLUMNS)}, created_at) VALUES ({", ".join("?" * (len(COLUMNS) + 1))})
ON CONFLICT(key) DO UPDATE SET
  {", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])}, lease_until = 0
WHERE excluded.version IS NULL OR items.version IS NULL OR excluded.version >= items.version
"""


class SqliteQueue:
    def __init__(self, path: str, max_attempts: int = 8, max_retry_delay: float = 6 * 3600):
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.max_retry_delay = max_retry_delay
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as error:
            raise QueueError(f"cannot open the retry queue {self.path}: {error}") from None

    def _write(self, sql: str, rows) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                self._db.execute("ROLLBACK") if self._db.in_transaction else None
                raise QueueError(f"retry queue {self.path}: {error}",
                                 hint="check free space and permissions of state_dir") from None

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
                item.status, moment)

    def stats(self) -> dict:
        with self._lock:
            rows = self._db.execute("SELECT status, kind, COUNT(*) FROM items GROUP BY status, kind").fetchall()
        result = {PENDING: 0, DEAD: 0, "by_kind": {}}
        for status, kind, count in rows:
            result[status] = result.get(status, 0) + count
            result["by_kind"][kind] = result["by_kind"].get(kind, 0) + count
        return result

    def list(self, status=None, limit=100) -> list:
        sql = f"SELECT {', '.join(COLUMNS)} FROM items"
        params = []
        if status:
            sql += " WHERE status = ?"
            params.append(status)
        sql += " ORDER BY created_at, rowid LIMIT ?"
        params.append(limit)
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [self._item(row) for row in rows]

    @staticmethod
    def _item(row) -> QueueItem:
        values = dict(zip(COLUMNS, row))
        values["index"] = values.pop("index_name")
        return QueueItem(**values)

    def close(self) -> None:
        with self._lock:
            self._db.close()
