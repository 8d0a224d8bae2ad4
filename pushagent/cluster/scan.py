"""Every (_id, stamps) of an index through a point in time, or a scroll where the server has none.

The read side of `verify --full`: the pages go straight into the `cluster`
table of a SQLite file (runs/fullscan.py diffs it with the batch's
documents), so memory stays bounded for any index size.
"""

import logging

from pushagent.cluster.client import ClusterRequestError
from pushagent.documents.builder import canonical_checksum

KEEP_ALIVE = "5m"


PAGE_SIZE = 10_000


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
