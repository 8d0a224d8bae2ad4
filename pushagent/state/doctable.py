"""A batch's documents on disk: one row per (index, id) with its checksum, plus a uniform sample.

Used three ways: during a push it records what the index should hold, the
documents the cluster acknowledged and those left in the retry queue
(`<state_dir>/runs/<batch_id>.docs.db`, one per shard of an array);
`verify` merges the shards' tables into the batch's; and `verify --source` /
`--full` load the source files into a temporary one. SQLite keeps memory
bounded for millions of ids, sorts checksums for the batch checksum, and lets
the full scan diff both sides with joins.
"""

import hashlib
import itertools
import random
import sqlite3
from pathlib import Path

from pushagent.errors import PushAgentError

SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (idx TEXT, id TEXT, version INTEGER, checksum TEXT, fno INTEGER, line INTEGER,
                                 op TEXT NOT NULL DEFAULT 'index', PRIMARY KEY (idx, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS occurrences (fno INTEGER, line INTEGER, PRIMARY KEY (fno, line)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sample (slot INTEGER PRIMARY KEY, idx TEXT, id TEXT);
CREATE TABLE IF NOT EXISTS files (fno INTEGER PRIMARY KEY, path TEXT UNIQUE);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER);
"""
# A row is what the batch's last word on a document is: index it (op 'index') or delete it ('delete').
# An acknowledged write replaces a row of the same version (a later line repeating the id won);
# a 409 or a queued document does not; a higher version always replaces.
ON_CONFLICT = ("ON CONFLICT (idx, id) DO UPDATE SET version = excluded.version, checksum = excluded.checksum, "
               "fno = excluded.fno, line = excluded.line, op = excluded.op WHERE excluded.version {} docs.version")
UPSERT = "INSERT INTO docs VALUES (?, ?, ?, ?, ?, ?, ?) " + ON_CONFLICT
# A shard's rows with its file numbers translated (`file_map`). Two shards hold one id only when the
# input repeats it; with equal versions the earlier shard's row stays. "WHERE true" lets SQLite
# parse the upsert clause after a SELECT.
MERGE_DOCS = ("INSERT INTO docs SELECT d.idx, d.id, d.version, d.checksum, m.new, d.line, d.op FROM shard.docs d "
              "JOIN file_map m ON m.old = d.fno WHERE true " + ON_CONFLICT.format(">"))
MERGE_OCCURRENCES = ("INSERT OR IGNORE INTO occurrences SELECT m.new, o.line FROM shard.occurrences o "
                     "JOIN file_map m ON m.old = o.fno")


def table_path(state_dir, key: str) -> Path:
    """Where a push keeps the table of a batch (`key` = batch id) or of one shard of it (shard.run_key)."""
    return Path(state_dir) / "runs" / f"{key}.docs.db"


class DocTable:
    """Documents of one batch keyed by (index, id); `add` is idempotent per input line."""

    def __init__(self, path, sample_size: int = 100, seed: str = ""):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sample_size = sample_size
        self._db = sqlite3.connect(str(self.path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._add_op_column()
        self._files = dict(self._db.execute("SELECT path, fno FROM files"))
        self._seen = self._meta("seen")
        # Reseeded from the number seen so far, so a resumed push keeps sampling reproducibly.
        self._rng = random.Random(f"{seed}:{self._seen}")

    def _add_op_column(self) -> None:
        # Tables written before deletes were told apart hold index operations only.
        if "op" not in {row[1] for row in self._db.execute("PRAGMA table_info(docs)")}:
            self._db.execute("ALTER TABLE docs ADD COLUMN op TEXT NOT NULL DEFAULT 'index'")

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0

    def reset(self) -> None:
        """Forget everything (a fresh or restarted batch)."""
        with self._transaction():
            for table in ("docs", "occurrences", "sample", "files", "meta"):
                self._db.execute(f"DELETE FROM {table}")
        self._files, self._seen = {}, 0

    def add(self, docs, replace_equal: bool) -> None:
        """Record documents; `replace_equal` when these won against an equal version (indexed, not 409)."""
        if not docs:
            return
        rows = [(d.index, d.doc_id, d.version, d.checksum, self._file_number(d.file), d.line, d.op) for d in docs]
        with self._transaction():
            self._db.executemany(UPSERT.format(">=" if replace_equal else ">"), rows)
            self._db.executemany("INSERT OR IGNORE INTO occurrences VALUES (?, ?)", [row[4:6] for row in rows])
            self._sample([row for row in rows if row[6] == "index"])

    def _file_number(self, path: str) -> int:
        if path not in self._files:
            self._files[path] = len(self._files)
            self._db.execute("INSERT INTO files VALUES (?, ?)", (self._files[path], path))
        return self._files[path]

    def _sample(self, rows) -> None:
        """Reservoir sampling (algorithm R): every document seen has the same chance to be in the sample.

        A push resumed after a crash sees the re-sent chunks twice; that
        skews the odds of at most `concurrency` chunks, not the uniformity overall.
        """
        for index, doc_id, *_ in rows:
            slot = self._seen if self._seen < self.sample_size else self._rng.randrange(self._seen + 1)
            self._seen += 1
            if slot < self.sample_size:
                self._db.execute("INSERT OR REPLACE INTO sample VALUES (?, ?, ?)", (slot, index, doc_id))
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('seen', ?)", (self._seen,))

    def _transaction(self):
        return _Transaction(self._db, self.path)

    def counts(self) -> dict:
        """Distinct documents per index the batch leaves in place, the ids it deleted, and how many input
        lines repeated an id already seen."""
        per_index = dict(self._db.execute("SELECT idx, COUNT(*) FROM docs WHERE op = 'index' GROUP BY idx"))
        rows, deleted = self._db.execute("SELECT COUNT(*), COUNT(*) FILTER (WHERE op = 'delete') FROM docs").fetchone()
        lines = self._db.execute("SELECT COUNT(*) FROM occurrences").fetchone()[0]
        return {"per_index": per_index, "distinct": sum(per_index.values()), "deleted": deleted,
                "duplicates": lines - rows}

    def sample(self) -> list:
        """[(index, id, checksum, version)] of the sampled documents (the winner of a duplicated id)."""
        return self._db.execute("SELECT s.idx, s.id, d.checksum, d.version FROM sample s JOIN docs d "
                                "ON d.idx = s.idx AND d.id = s.id WHERE d.op = 'index' ORDER BY s.slot").fetchall()

    def documents(self, index: str, op: str = "index"):
        """(id, version, checksum) of every row of `op` in `index`, in id order."""
        return self._db.execute("SELECT id, version, checksum FROM docs WHERE idx = ? AND op = ? ORDER BY id",
                                (index, op))

    def earlier_lines(self, index: str, doc_ids: list) -> dict:
        """{id: (file, line)} of the rows of `doc_ids` in `index`: where the batch already met them."""
        files = self.files()
        return {doc_id: (files[fno], line)
                for doc_id, fno, line in rows_with_ids(self._db, "SELECT id, fno, line FROM docs WHERE idx = ?",
                                                       index, doc_ids)}

    def checksum(self) -> str:
        """sha256 over the sorted per-document checksums, one hex digest and a newline each."""
        digest = hashlib.sha256()
        for (checksum,) in self._db.execute("SELECT checksum FROM docs WHERE op = 'index' ORDER BY checksum"):
            digest.update(checksum.encode() + b"\n")
        return digest.hexdigest()

    def indices(self) -> list:
        return [row[0] for row in self._db.execute("SELECT DISTINCT idx FROM docs ORDER BY idx")]

    def query(self, sql: str, params=()):
        """A cursor over the tables (for the full-scan diff)."""
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows) -> None:
        with self._transaction():
            self._db.executemany(sql, rows)

    def files(self) -> list:
        """Input paths by file number."""
        return [row[0] for row in self._db.execute("SELECT path FROM files ORDER BY fno")]

    def merge(self, paths, seed: str) -> None:
        """Replace the contents with the union of the tables at `paths` (the shards of one batch).

        The sample stays uniform over the union: see `combined_sample`.
        """
        self.reset()
        populations = [self._absorb(Path(path)) for path in paths]
        rows = combined_sample(populations, self.sample_size, random.Random(seed))
        self._seen = sum(seen for seen, _ in populations)
        with self._transaction():
            self._db.executemany("INSERT INTO sample VALUES (?, ?, ?)",
                                 [(slot, index, doc_id) for slot, (index, doc_id) in enumerate(rows)])
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('seen', ?)", (self._seen,))

    def _absorb(self, path: Path) -> tuple:
        """Add the documents and input lines of the table at `path`; (documents it saw, its sample)."""
        if not path.is_file():
            raise PushAgentError("this table of a shard's documents is missing", file=str(path),
                                 hint="push that shard again (same inputs, --batch-id and --shard) to rebuild it")
        try:
            self._db.execute("ATTACH DATABASE ? AS shard", (str(path),))
        except sqlite3.Error as error:
            raise PushAgentError(f"cannot read this table of a shard's documents: {error}", file=str(path)) from None
        try:
            with self._transaction():
                self._map_files()
                self._db.execute(MERGE_DOCS)
                self._db.execute(MERGE_OCCURRENCES)
                seen = self._db.execute("SELECT value FROM shard.meta WHERE key = 'seen'").fetchone()
                sample = self._db.execute("SELECT idx, id FROM shard.sample ORDER BY slot").fetchall()
        finally:
            self._db.execute("DETACH DATABASE shard")
        return (seen[0] if seen else 0), sample

    def _map_files(self) -> None:
        """temp.file_map: the attached shard's file numbers -> ours (numbers stay 0, 1, ... in order seen)."""
        self._db.execute("CREATE TEMP TABLE IF NOT EXISTS file_map (old INTEGER PRIMARY KEY, new INTEGER)")
        self._db.execute("DELETE FROM file_map")
        shard_files = self._db.execute("SELECT fno, path FROM shard.files").fetchall()
        self._db.executemany("INSERT INTO file_map VALUES (?, ?)",
                             [(fno, self._file_number(path)) for fno, path in shard_files])

    def close(self) -> None:
        self._db.close()


def deletions_in(path: Path, index: str, doc_ids: list) -> dict:
    """{id: version} of the ids among `doc_ids` that the table at `path` records as deleted from `index`."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return {}
    try:
        return dict(rows_with_ids(db, "SELECT id, version FROM docs WHERE op = 'delete' AND idx = ?", index, doc_ids))
    except sqlite3.Error:
        return {}        # a table of an older shape holds no deletes
    finally:
        db.close()


def rows_with_ids(db, select: str, index: str, doc_ids: list, page: int = 500):
    """The rows of `select` (with one parameter, the index) whose id is one of `doc_ids`, `page` ids a query."""
    for start in range(0, len(doc_ids), page):
        part = doc_ids[start:start + page]
        yield from db.execute(f"{select} AND id IN ({','.join('?' * len(part))})", (index, *part))


def combined_sample(populations, size: int, rng: random.Random) -> list:
    """`size` items drawn uniformly from the union of populations given as (number seen, uniform sample).

    Drawing one item at a time from the shards in proportion to what each
    has left is a draw without replacement from the union: it says how many
    items each shard gives. A shard gives them at random from its own
    uniform sample, which holds that many unless the shard was pushed with a
    smaller `sample_size`.
    """
    left = [seen for seen, _ in populations]
    taken = [0] * len(populations)
    for _ in range(min(size, sum(left))):
        pick = rng.randrange(sum(left))
        shard = next(number for number, total in enumerate(itertools.accumulate(left)) if pick < total)
        left[shard] -= 1
        taken[shard] += 1
    return [row for (_, sample), count in zip(populations, taken)
            for row in rng.sample(sample, min(count, len(sample)))]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error; SQLite errors become PushAgentError."""

    def __init__(self, db, path: Path):
        self.db, self.path = db, path

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, error, traceback):
        try:
            self.db.execute("ROLLBACK" if kind else "COMMIT")
        except sqlite3.Error as commit_error:
            kind, error = type(commit_error), commit_error
        if kind is not None and issubclass(kind, sqlite3.Error):
            self.db.execute("ROLLBACK") if self.db.in_transaction else None
            full = getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            raise PushAgentError(f"cannot write {self.path}: {'No space left on device' if full else error}",
                                 file=str(self.path), hint="free space or fix permissions in state_dir, then rerun"
                                 ) from None
        return False
