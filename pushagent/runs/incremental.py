"""`push --incremental`: send only the documents the cluster does not already hold as the agent wrote them.

Before a chunk is sent, one `_mget` (counted against the rate limit) reads
three stamps of each of its documents: `sync_checksum`, `embedding_version`
and `last_updated`. A document is unchanged when the checksum and the
embedding version are ours and its version is still the one the agent gave
it: the batch time its `last_updated` names (or, with `version_field`, the
record's own version). An edit made behind the agent's back moves the
version on, so the document is sent again: the cluster is the truth; the
tables of earlier batches on this side only say which version to expect.

Those tables also name each document's input line (a digest of its bytes):
a line an earlier batch built, byte for byte and under the same settings,
makes the same document, so it is not parsed, checksummed or stamped again
unless the cluster turns out not to hold it (`recognise`). In a regenerated
snapshot that is most lines, and building them is most of the work.
"""

import glob
import logging
import re
import sqlite3
import threading

import orjson

from pushagent.cluster.client import ClusterRequestError, ReadClient
from pushagent.documents.builder import MAX_ID_BYTES, Builder, line_digest, ms_from_iso
from pushagent.documents.buildpool import batched
from pushagent.errors import ChunkAborted
from pushagent.state.doctable import rows_with_ids, table_path
from pushagent.state.records import SyncStateStore

log = logging.getLogger(__name__)
PRIOR_BATCHES = 3            # earlier batches whose tables give the versions to check against
KNOWN_BATCH, KNOWN_BYTES = 1000, 8 * 1024**2    # lines looked up together in the earlier tables; their bytes
# Build settings under which the same line makes the same document; with a version or an index from the
# record, every line is built (its version, or index, is not in the tables' lookup).
IDENTITY = ("id_field", "default_index", "index_field", "version_field", "op_field", "embedding_version_field",
            "timestamp_field", "checksum_field", "batch_field")


class PriorWrites:
    """What the latest earlier batches of this state directory, of the same embedding version, recorded
    for each id: (version, checksum), from their tables of documents (read only, newest batch first)."""

    def __init__(self, state_dir, settings):
        records = [record for record in SyncStateStore(state_dir).list()
                   if record["batch_id"] != settings.batch_id
                   and record.get("embedding_version") == settings.embedding_version
                   and (record.get("batch_time") or "") <= settings.batch_time_iso]
        records.sort(key=lambda record: record.get("batch_time") or "", reverse=True)
        tables = [(path, _same_build(record, settings)) for record in records[:PRIOR_BATCHES]
                  for path in _tables_of(state_dir, record["batch_id"])]
        self._dbs = [sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False) for path, _ in tables]
        self._same_build = [db for db, (_, same) in zip(self._dbs, tables) if same]
        self._index = settings.default_index
        self._lock = threading.Lock()

    def lookup(self, index: str, doc_ids: list) -> dict:
        found = {}
        with self._lock:
            for db in self._dbs:
                wanted = [doc_id for doc_id in doc_ids if doc_id not in found]
                try:
                    rows = list(rows_with_ids(db, "SELECT id, version, checksum FROM docs WHERE op = 'index' "
                                                  "AND idx = ?", index, wanted)) if wanted else []
                except sqlite3.Error:
                    continue    # a table of an older shape or being rebuilt: no hints from it
                found.update((doc_id, (version, checksum)) for doc_id, version, checksum in rows)
        return found

    def known_lines(self, lines: list) -> dict:
        """{digest: (index, id, checksum, version)} of the (likely id, digest) lines that an earlier batch built
        under the same settings: its row for that id names the same line digest (newest batch first)."""
        found = {}
        with self._lock:
            for db in self._same_build:
                # An older table is asked only about the lines the newer ones did not know.
                left = [(doc_id, digest) for doc_id, digest in lines if digest not in found]
                if not left:
                    break
                try:
                    rows = rows_with_ids(db, "SELECT id, digest, checksum, version FROM docs WHERE op = 'index' "
                                             "AND idx = ?", self._index, [doc_id for doc_id, _ in left])
                    recorded = {doc_id: (line, checksum, version) for doc_id, line, checksum, version in rows}
                except sqlite3.Error:
                    continue    # a table of an older shape: it knows no lines
                for doc_id, digest in left:
                    line, checksum, version = recorded.get(doc_id, (None, None, None))
                    if line == digest and digest not in found:
                        found[digest] = (self._index, doc_id, checksum, version)
        return found

    def close(self) -> None:
        for db in self._dbs:
            db.close()


def _same_build(record: dict, settings) -> bool:
    build = record.get("build") or {}
    return (settings.index_field is None and settings.version_field is None
            and all(build.get(key) == getattr(settings, key) for key in IDENTITY))


def _likely_id(raw: bytes, key: bytes) -> str | None:
    """The id a line likely holds, read without parsing it: the plain string or integer after the first
    `"<id_field>":`. A wrong guess costs nothing but a lookup: a line is known only when its digest is the one
    recorded for that id, that is when it is the very line that built that document."""
    start = raw.find(key)
    if start < 0:
        return None
    value = raw[start + len(key):start + len(key) + MAX_ID_BYTES + 2].lstrip()
    if value[:1] == b'"':
        end = value.find(b'"', 1)
        text = value[1:end]
        return text.decode(errors="replace") if end > 0 and b"\\" not in text else None
    digits = re.match(rb"-?[0-9]+", value)
    return digits and digits.group().decode()


def _tables_of(state_dir, batch_id: str) -> list:
    """The batch's table of documents, or its shards' while they are not merged."""
    whole = table_path(state_dir, batch_id)
    if whole.exists():
        return [whole]
    return sorted(whole.parent.glob(f"{glob.escape(batch_id)}.shard-*.docs.db"))


class ChangeProbe:
    """Splits a chunk's documents into (to send, unchanged); thread-safe, one client per worker thread.

    One realtime `_mget` a chunk. For a document an earlier batch recorded
    with this very checksum, it asks only for the version (`_source: false`,
    some 30x cheaper than reading stamps out of a stored source with its
    embedding): the same version means nothing wrote it since. For the others
    it reads the stamps. An `ids` search over doc values would be cheaper
    still, but sees refreshed documents only: an edit made a second ago, or
    any edit while an index's refresh is off, would look unchanged.
    """

    def __init__(self, config, cluster, settings, rate_limiter, stop_event: threading.Event, stats):
        self.cluster, self.settings, self.stats = cluster, settings, stats
        self.rate_limiter, self.stop_event = rate_limiter, stop_event
        self.prior = PriorWrites(config.state_path, settings)
        self._local = threading.local()
        self._clients = []
        self._lock = threading.Lock()
        self._warned = False

    def recognise(self, lines, builder):
        """(raw line, file, number, position) lines with those an earlier batch built, byte for byte, replaced by
        their known documents (Builder.known); the others pass as they are."""
        limit, key = self.settings.max_record_bytes, orjson.dumps(self.settings.id_field) + b":"
        for batch in batched(lines, KNOWN_BATCH, KNOWN_BYTES):
            likely = [_likely_id(raw, key) if isinstance(raw, bytes) and len(raw) <= limit else None
                      for raw, *_ in batch]
            digests = [line_digest(raw) if doc_id else None for (raw, *_), doc_id in zip(batch, likely)]
            known = self.prior.known_lines([pair for pair in zip(likely, digests) if pair[0]])
            for (raw, file, number, position), digest in zip(batch, digests):
                hit = known.get(digest)
                yield (builder.known(raw, file, number, digest, *hit) if hit else raw), file, number, position

    def split(self, docs: list) -> tuple[list, list]:
        """(to send, built; unchanged): a known document to send is built now."""
        # Later lines of a repeated id are always sent: they must land after the earlier line.
        candidates = [doc for doc in docs if doc.op == "index" and doc.version_type == "external"]
        try:
            held = self._held(candidates) if candidates else set()
        except ClusterRequestError as error:
            self._warn(error)
            held = set()
        send = [doc for doc in docs if id(doc) not in held]
        if any(doc.raw for doc in send):
            builder = Builder(self.settings)    # one per call: the sending threads build side by side
            send = [builder.complete(doc) if doc.raw else doc for doc in send]
        return send, [doc for doc in docs if id(doc) in held]

    def _held(self, docs: list) -> set:
        """id() of the documents of `docs` the cluster holds unchanged; their version becomes the held one."""
        if not self.rate_limiter.acquire(self.stop_event):
            raise ChunkAborted()
        self.stats.record_probe()
        settings = self.settings
        # A known line's document brings the version its batch recorded; the others are looked up.
        hints = {(doc.index, doc.doc_id): doc.recorded_version for doc in docs if doc.recorded_version is not None}
        built = [doc for doc in docs if doc.recorded_version is None]
        for index in {doc.index for doc in built}:
            found = self.prior.lookup(index, [doc.doc_id for doc in built if doc.index == index])
            # A hint only where an earlier batch recorded this very content.
            hints.update(((index, doc.doc_id), found[doc.doc_id][0]) for doc in built
                         if doc.index == index and found.get(doc.doc_id, (None, None))[1] == doc.checksum)
        stamps = [settings.checksum_field, settings.embedding_version_field, settings.timestamp_field]
        asked = [{"_index": doc.index, "_id": doc.doc_id,
                  "_source": False if hints.get((doc.index, doc.doc_id)) else stamps} for doc in docs]
        answers = self._client().request("POST", "/_mget", {"docs": asked})["docs"]
        held = set()
        for doc, answer in zip(docs, answers):
            version = self._held_version(doc, answer, hints.get((doc.index, doc.doc_id)))
            if version is not None:
                doc.version = version       # what the cluster holds: the batch's table records that
                held.add(id(doc))
        return held

    def _held_version(self, doc, answer: dict, hinted: int | None) -> int | None:
        """The version the cluster holds `doc` at, as the agent wrote it, or None when it must be sent."""
        if not answer.get("found"):
            return None
        if hinted is not None:
            return hinted if answer.get("_version") == hinted else None
        return answer["_version"] if self._unchanged(doc, answer) else None

    def _unchanged(self, doc, answer: dict) -> bool:
        """The stamps say the agent wrote this content (checksum, embedding version) at the version it has."""
        source, settings = answer.get("_source") or {}, self.settings
        if (source.get(settings.checksum_field) != doc.checksum
                or source.get(settings.embedding_version_field) != settings.embedding_version):
            return False
        written = doc.version if settings.version_field else _ms(source.get(settings.timestamp_field))
        return written is not None and answer.get("_version") == written

    def _client(self) -> ReadClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.cluster.client()
            with self._lock:
                self._clients.append(client)
        return client

    def _warn(self, error) -> None:
        with self._lock:
            if not self._warned:
                log.warning("--incremental: could not ask the cluster what it holds (%s); sending whole chunks",
                            error)
            self._warned = True

    def close(self) -> None:
        self.prior.close()
        for client in self._clients:
            client.close()


def _ms(stamp) -> int | None:
    """Milliseconds of a time stamp (as the builder writes them), None if it is not one."""
    try:
        return ms_from_iso(stamp)
    except ValueError:
        return None
