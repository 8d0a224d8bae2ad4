"""Ids a batch repeats: the last line wins, at any concurrency (SPEC section 10).

Every line of a batch carries the batch's version, so two lines with one id
tie, and with plain external versioning whichever request the cluster took
first would win. A later line is sent with `external_gte` instead, which
replaces a document of the same version, and never before the chunk holding
the earlier line has been resolved: each later line lands after the one
before it, so the last one stays. A delete after an index of the same id
works the same way.
"""

import logging

MAX_WARNINGS = 20
log = logging.getLogger(__name__)


class RepeatedIds:
    """Marks the later lines of repeated ids in each chunk before it is sent.

    `earlier_lines(index, ids)` answers {id: (file, line)} for the documents
    of resolved chunks (the batch's table); chunks in flight are tracked here.
    """

    def __init__(self, earlier_lines):
        self._earlier_lines = earlier_lines
        self._in_flight = {}         # (index, id) -> (chunk seq, file, line) of chunks sent and not resolved
        self.count = 0

    def mark(self, chunk) -> int:
        """Let the chunk's later lines win; returns the seq of the last chunk it must wait for (-1: none)."""
        earlier = self._earlier(chunk)
        wait_for, marked = -1, False
        for doc in chunk.docs:
            key = (doc.index, doc.doc_id)
            before = earlier.get(key)
            if before is not None and before[1:] != (doc.file, doc.line):
                doc.win_equal_version()
                marked = True
                wait_for = max(wait_for, before[0])
                self._tell(doc, before)
            earlier[key] = (-1, doc.file, doc.line)
            self._in_flight[key] = (chunk.seq, doc.file, doc.line)
        if marked:
            chunk.rewrite()
        return wait_for

    def _earlier(self, chunk) -> dict:
        """(index, id) -> (seq or -1, file, line) of an earlier line of each id of the chunk, if any."""
        earlier, unknown = {}, {}
        for doc in chunk.docs:
            key = (doc.index, doc.doc_id)
            if key in self._in_flight:
                earlier[key] = self._in_flight[key]
            else:
                unknown.setdefault(doc.index, []).append(doc.doc_id)
        for index, doc_ids in unknown.items():
            for doc_id, (file, line) in self._earlier_lines(index, doc_ids).items():
                earlier[(index, doc_id)] = (-1, file, line)
        return earlier

    def resolved(self, chunk) -> None:
        for doc in chunk.docs:
            key = (doc.index, doc.doc_id)
            if self._in_flight.get(key, (None,))[0] == chunk.seq:
                del self._in_flight[key]

    def _tell(self, doc, before) -> None:
        self.count += 1
        if self.count <= MAX_WARNINGS:
            log.warning("%s:%s: id %r repeats %s:%s of this batch: the later line wins", doc.file, doc.line,
                        doc.doc_id, before[1], before[2])
        elif self.count == MAX_WARNINGS + 1:
            log.warning("more lines repeat an id of this batch: the report counts them under `duplicates`")
