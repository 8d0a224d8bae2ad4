"""`verify --full`: the scan of the index (cluster/scan.py) diffed with the batch's documents.

Both sides live in one SQLite file (the source DocTable plus a `cluster`
table), so memory stays bounded for any index size and the diff is a few
joins. Missing documents can be put into the retry queue for `drain`.
"""

import time

from pushagent.cluster.scan import scan_into
from pushagent.documents.builder import Builder, Doc
from pushagent.inputs.reader import expand_inputs, read_lines
from pushagent.state.retry_queue import REPAIR, QueueItem

ENQUEUE_BATCH = 1_000


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
