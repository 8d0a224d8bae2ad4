"""`verify --full`: every (_id, checksum) of the index through a point in time (or a scroll), diffed with the source.

Both sides live in one SQLite file (the source DocTable plus a `cluster`
table), so memory stays bounded for any index size and the diff is three
joins. Missing documents can be put into the retry queue for `drain`.
"""

import logging
import time

from .builder import Builder, Doc, canonical_checksum
from .cluster import ClusterRequestError
from .reader import expand_inputs, read_lines
from .retry_queue import REPAIR, QueueItem

KEEP_ALIVE = "5m"
PAGE_SIZE = 10_000
ENQUEUE_BATCH = 1_000
# Only what the diff reads: a 10k-hit page stays around a megabyte.
SCAN_FILTER = "pit_id,hits.hits._id,hits.hits._source,hits.hits.sort"
# search_after needs a unique sort. Elasticsearch has _shard_doc for PIT.
# OpenSearch 2.x has none, and _doc repeats across shards (paging on it
# loses documents); sorting on _id works but costs a sort of the rest of the
# index per page (15k ids/s at 1M) and _id fielddata on the heap. So OpenSearch
# scans one slice per shard (slice.max = shards maps each slice to one shard),
# where _doc is unique and cheap. The total of the PIT is checked at the end.
SORT = {"opensearch": [{"_doc": "asc"}], "elasticsearch": [{"_shard_doc": "asc"}]}
# A scroll is a snapshot too and one scroll walks every shard, so `_doc` (the cheapest order) is enough.
SCROLL_FILTER = "_scroll_id,hits.total,hits.hits._id,hits.hits._source"
# Known from GET /, these skip a refused PIT request. Elasticsearch has had a PIT since 7.10 (and
# _shard_doc since 7.12; 7.17 is the oldest line scripts/compat.sh checks), so it is not asked for its
# version; a server that hides its version is found out by the refusal.
FIRST_PIT_VERSION = {"opensearch": (2, 4)}

log = logging.getLogger(__name__)


class IncompleteScan(ClusterRequestError):
    """The scan returned another number of documents than its point in time (or scroll) holds."""


class PointInTime:
    """Open, page through and close a PIT with the API of either distribution."""

    def __init__(self, client, index: str, flavor: str):
        self.client, self.index, self.flavor = client, index, flavor
        self.pit_id = None

    def open(self):
        if self.flavor == "opensearch":
            answer = self.client.request("POST", f"/{self.index}/_search/point_in_time",
                                         params={"keep_alive": KEEP_ALIVE})
            self.pit_id = answer["pit_id"]
        else:
            self.pit_id = self.client.request("POST", f"/{self.index}/_pit", params={"keep_alive": KEEP_ALIVE})["id"]
        return self

    def total(self) -> dict:
        """Documents in the point in time, and its number of shards."""
        body = {"size": 0, "pit": {"id": self.pit_id, "keep_alive": KEEP_ALIVE}, "track_total_hits": True}
        answer = self.client.request("POST", "/_search", body)
        return {"docs": answer["hits"]["total"]["value"], "shards": answer["_shards"]["total"]}

    def pages(self, source_fields: list, shard_slice: tuple | None = None):
        """Yield lists of hits until the index (or the slice (id, max)) is exhausted."""
        search_after = None
        while True:
            body = {"size": PAGE_SIZE, "pit": {"id": self.pit_id, "keep_alive": KEEP_ALIVE},
                    "sort": SORT[self.flavor], "_source": source_fields, "track_total_hits": False}
            if shard_slice:
                body["slice"] = {"id": shard_slice[0], "max": shard_slice[1]}
            if search_after is not None:
                body["search_after"] = search_after
            answer = self.client.request("POST", "/_search", body, params={"filter_path": SCAN_FILTER})
            self.pit_id = answer.get("pit_id", self.pit_id)  # the id may change between pages
            hits = answer.get("hits", {}).get("hits", [])
            if not hits:
                return
            yield hits
            search_after = hits[-1]["sort"]

    def close(self) -> None:
        try:
            if self.flavor == "opensearch":
                self.client.request("DELETE", "/_search/point_in_time", {"pit_id": [self.pit_id]})
            else:
                self.client.request("DELETE", "/_pit", {"id": self.pit_id})
        except ClusterRequestError:
            pass  # it expires by itself after KEEP_ALIVE


def stamped_checksum(checksum_field: str, batch_field: str):
    """Read the stored sync_checksum and batch stamps: only ids and stamps travel."""
    return [checksum_field, batch_field], lambda source: (source.get(checksum_field), source.get(batch_field))


def recomputed_checksum(stamped_fields: tuple, batch_field: str):
    """Recompute from the whole _source (--recompute): also catches content edited behind a stale stamp."""
    return True, lambda source: (canonical_checksum(source, stamped_fields), source.get(batch_field))


class Scroll:
    """Page through an index with the scroll API: for servers without a point in time (OpenSearch before 2.4).

    Needs only read privilege, like the PIT. The first search opens the
    scroll and tells its total; `close` clears it (else it expires after KEEP_ALIVE).
    """

    def __init__(self, client, index: str, source_fields):
        self.client, self.index, self.source_fields = client, index, source_fields
        self.scroll_id, self.total, self._first = None, 0, []

    def __enter__(self):
        body = {"size": PAGE_SIZE, "sort": ["_doc"], "_source": self.source_fields, "track_total_hits": True}
        answer = self.client.request("POST", f"/{self.index}/_search", body,
                                     params={"scroll": KEEP_ALIVE, "filter_path": SCROLL_FILTER})
        self.scroll_id, hits = answer.get("_scroll_id"), answer.get("hits", {})
        total = hits.get("total", 0)
        self.total = total["value"] if isinstance(total, dict) else total
        self._first = hits.get("hits", [])
        return self

    def pages(self):
        """Yield lists of hits until the scroll is exhausted."""
        hits = self._first
        while hits:
            yield hits
            answer = self.client.request("POST", "/_search/scroll", {"scroll": KEEP_ALIVE, "scroll_id": self.scroll_id},
                                         params={"filter_path": SCROLL_FILTER})
            self.scroll_id = answer.get("_scroll_id", self.scroll_id)
            hits = answer.get("hits", {}).get("hits", [])

    def __exit__(self, *exc):
        if self.scroll_id:
            try:
                self.client.request("DELETE", "/_search/scroll", {"scroll_id": [self.scroll_id]})
            except ClusterRequestError:
                pass  # it expires by itself after KEEP_ALIVE


def scan_into(client, table, index: str, flavor: str, checksum) -> int:
    """Copy (_id, checksum) of every document of `index` into the table's `cluster` table.

    `checksum` is (source fields to fetch, function of the returned _source).
    Uses a point in time, or a scroll where the server has no PIT API.
    Raises IncompleteScan when the pages do not add up to the snapshot's total.
    """
    table.query("CREATE TABLE IF NOT EXISTS cluster (idx TEXT, id TEXT, checksum TEXT, batch TEXT, "
                "PRIMARY KEY (idx, id)) WITHOUT ROWID")
    pit = _open_pit(client, index, flavor)
    if pit is None:
        log.info("%s has no point-in-time API: the full scan of %s goes through a scroll", client.base, index)
        with Scroll(client, index, checksum[0]) as scroll:
            return _copy_pages(table, index, checksum[1], scroll.pages(), scroll.total, "scroll")
    try:
        return _scan_pit(pit, table, index, checksum)
    finally:
        pit.close()


def _open_pit(client, index: str, flavor: str) -> PointInTime | None:
    """A PIT opened with the first API the server answers; None when it has none."""
    for try_flavor in _pit_flavors(client, flavor):
        try:
            return PointInTime(client, index, try_flavor).open()
        except ClusterRequestError as error:
            if not _no_such_endpoint(error):
                raise
    return None


def _pit_flavors(client, flavor: str) -> list:
    """The PIT APIs worth trying: both when the distribution is unknown, none when GET / names a server before PIT."""
    if flavor not in SORT:
        return list(SORT)
    first = FIRST_PIT_VERSION.get(flavor)
    return [] if first and _predates(client.info().get("version"), first) else [flavor]


def _predates(version: str | None, first: tuple) -> bool:
    try:
        return tuple(int(part) for part in version.split(".")[:2]) < first
    except (AttributeError, ValueError):
        return False  # version unknown: try the PIT and learn from the answer


def _no_such_endpoint(error: ClusterRequestError) -> bool:
    # 400 "no handler found for uri", 405 "incorrect HTTP method", or a 404 from a proxy in front;
    # a 404 for a missing index is an answer of the PIT API itself.
    return error.status in (400, 404, 405) and "index_not_found_exception" not in error.message


def _scan_pit(pit: PointInTime, table, index: str, checksum) -> int:
    fields, checksum_of = checksum
    total = pit.total()
    slices = [None]
    if pit.flavor == "opensearch" and total["shards"] > 1:
        slices = [(number, total["shards"]) for number in range(total["shards"])]
    pages = (hits for shard_slice in slices for hits in pit.pages(fields, shard_slice))
    return _copy_pages(table, index, checksum_of, pages, total["docs"], "point in time")


def _copy_pages(table, index: str, checksum_of, pages, total: int, snapshot: str) -> int:
    scanned = 0
    for hits in pages:
        rows = [(index, hit["_id"], *checksum_of(hit.get("_source") or {})) for hit in hits]
        table.executemany("INSERT OR REPLACE INTO cluster VALUES (?, ?, ?, ?)", rows)
        scanned += len(rows)
    if scanned != total:
        raise IncompleteScan(f"the scan of {index} returned {scanned} documents, its {snapshot} holds {total}",
                             hint="report this: the paging of the full scan is wrong")
    return scanned


# The batch's documents (`docs`: the last word of its input on each id) against the index (`cluster`).
# A document another batch stamped is superseded, not mismatched: versions only move up.
DIFF = {
    "missing": "SELECT d.idx, d.id, d.version FROM docs d LEFT JOIN cluster c ON c.idx = d.idx AND c.id = d.id "
               "WHERE d.op = 'index' AND c.id IS NULL",
    "extra": "SELECT c.idx, c.id, 0 FROM cluster c LEFT JOIN docs d ON d.idx = c.idx AND d.id = c.id "
             "WHERE d.id IS NULL OR (d.op = 'delete' AND (c.batch IS NULL OR c.batch IS :batch))",
    "mismatched": "SELECT d.idx, d.id, d.version FROM docs d JOIN cluster c ON c.idx = d.idx AND c.id = d.id "
                  "WHERE d.op = 'index' AND c.checksum IS NOT d.checksum AND (c.batch IS NULL OR c.batch IS :batch)",
    "superseded": "SELECT d.idx, d.id, d.version FROM docs d JOIN cluster c ON c.idx = d.idx AND c.id = d.id "
                  "WHERE d.op = 'index' AND c.checksum IS NOT d.checksum AND c.batch IS NOT :batch",
}


def full_scan(client, table, indices: list, flavor: str, checksum, list_limit: int, batch_id=None,
              deleted_later=None) -> dict:
    """Scan every index, diff against the source; counts of each kind plus the first `list_limit` ids.

    `deleted_later(index, {id: version})` names the missing ids a later batch deleted: superseded too.
    """
    started = time.monotonic()
    scanned = sum(scan_into(client, table, index, flavor, checksum) for index in indices)
    seconds = time.monotonic() - started
    result = {"scanned": scanned, "seconds": round(seconds, 3),
              "ids_per_s": round(scanned / seconds, 1) if seconds else None}
    gone = [(index, doc_id) for index, missing in _missing_by_index(table) if deleted_later
            for doc_id in deleted_later(index, missing)]
    # A later batch deleted them: they stand as superseded, like the documents a later batch rewrote.
    table.executemany("INSERT INTO cluster VALUES (?, ?, NULL, '')", gone)
    params = {"batch": batch_id}
    for kind in DIFF:
        sql = DIFF[kind]
        result[kind] = table.query(f"SELECT COUNT(*) FROM ({sql})", params).fetchone()[0]
        result[f"{kind}_ids"] = [row[1] for row in table.query(f"{sql} ORDER BY 2 LIMIT :limit",
                                                                 {**params, "limit": list_limit})]
    return result


def _missing_by_index(table, page: int = 10_000):
    """(index, {id: version}) pages of the batch's documents the scan did not find."""
    rows = table.query(DIFF["missing"] + " ORDER BY d.idx, d.id", {"batch": None})
    while batch := rows.fetchmany(page):
        for index in sorted({row[0] for row in batch}):
            yield index, {doc_id: version for idx, doc_id, version in batch if idx == index}


def enqueue(table, settings, retry_queue, batch_id: str, repair: bool, s3_endpoint_url=None) -> int:
    """Put every missing document (and, to `repair`, every mismatched one), built again from its source
    line, into the retry queue, due now; returns how many.

    Repairs are sent with external_gte and marked, so that `drain` makes them win over an edit or a
    delete made by hand (their version moved past ours) but not over a later batch.
    The lines come sorted by file and line and are merged with one pass over
    each file that has any, so neither side is held in memory.
    """
    kinds = ("missing", "mismatched") if repair else ("missing",)
    wanted = " UNION ".join(DIFF[kind] for kind in kinds)
    rows = table.query(f"SELECT d.fno, d.line FROM docs d JOIN ({wanted}) w ON w.idx = d.idx AND w.id = d.id "
                       "ORDER BY d.fno, d.line", {"batch": settings.batch_id})
    builder, paths, batch, put = Builder(settings), table.files(), [], 0
    lines, lines_fno = iter(()), None
    for fno, line in rows:
        if fno != lines_fno:
            input_file, lines_fno = expand_inputs([paths[fno]], s3_endpoint_url)[0], fno
            lines = read_lines(input_file)
        entry = next((entry for entry in lines if entry.number >= line), None)
        doc = builder.build(entry.data, input_file.path, line) if entry and entry.number == line else None
        if isinstance(doc, Doc):
            batch.append(_queue_item(batch_id, doc, repair))
        if len(batch) >= ENQUEUE_BATCH:
            put, batch = put + _put(retry_queue, batch), []
    return put + _put(retry_queue, batch)


def _queue_item(batch_id: str, doc: Doc, repair: bool) -> QueueItem:
    kind, reason = ((REPAIR, "missing or changed in the index (verify --full --repair)") if repair
                    else ("retryable", "missing from the index (verify --full)"))
    return QueueItem(QueueItem.document_key(doc.index, doc.doc_id), batch_id, doc.index, doc.doc_id, doc.version,
                     doc.op, doc.source, doc.file, doc.line, kind, reason, next_attempt_at=time.time(),
                     version_type="external_gte" if repair else "external")


def _put(retry_queue, items) -> int:
    if items:
        retry_queue.put(items)
    return len(items)
