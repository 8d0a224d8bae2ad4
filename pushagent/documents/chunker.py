"""Group built documents into bulk requests of at most chunk_docs and chunk_bytes.

A chunk also carries the quarantined lines met while it was filled and the
input position after its last line, so resolving the chunk resolves every
line up to that position (the checkpoint commits exactly that).

A chunk keeps one copy of its documents' bytes: each fed document is
appended to the chunk's NDJSON body, and once the chunk is full its
documents' `action` and `source` become zero-copy views of that body. The
first request sends the body as it is; only a retry of a subset joins views.
"""

import dataclasses
from typing import NamedTuple

from pushagent.documents.builder import Doc, Rejected


class Position(NamedTuple):
    """Where reading stands: input file number, byte offset, line number."""

    file_index: int
    offset: int
    line: int


@dataclasses.dataclass
class Chunk:
    seq: int
    docs: list = dataclasses.field(default_factory=list)
    rejected: list = dataclasses.field(default_factory=list)
    end: Position | None = None
    nbytes: int = 0
    body: bytearray = dataclasses.field(default_factory=bytearray)
    _spans: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0         # time its worker spent resolving it, for logs and metrics

    @property
    def records(self) -> int:
        return len(self.docs) + len(self.rejected)

    def add(self, item: Doc | Rejected, size: int) -> None:
        if isinstance(item, Doc):
            body = self.body
            body += item.action
            self._spans.append(len(body))
            if item.source:
                body += item.source
            self._spans.append(len(body))
            item.action = item.source = None  # the body holds them now
            self.docs.append(item)
        else:
            self.rejected.append(item)
        self.nbytes += size

    def rewrite(self) -> None:
        """Build the body again after documents changed their action lines (see Doc.win_equal_version)."""
        docs, nbytes = self.docs, self.nbytes
        self.docs, self.body, self._spans = [], bytearray(), []
        for doc in docs:
            doc.action, doc.source = bytes(doc.action), doc.source and bytes(doc.source)
            self.add(doc, 0)
        self.nbytes = nbytes
        self.seal()

    def seal(self) -> "Chunk":
        """Point each document's action and source into the body; the body is final."""
        view, start = memoryview(self.body), 0
        for doc, middle, end in zip(self.docs, self._spans[::2], self._spans[1::2]):
            doc.action, doc.source = view[start:middle], (view[middle:end] if end > middle else None)
            start = end
        self._spans = []
        return self


def bulk_body(docs) -> bytes:
    """The NDJSON body of a _bulk request for `docs` (a chunk's `body` when all of them)."""
    return b"".join(part for doc in docs for part in (doc.action, doc.source) if part)


class Chunker:
    """feed() returns a full chunk or None; flush() returns what is left."""

    def __init__(self, chunk_docs: int, chunk_bytes: int, first_seq: int = 0):
        self.chunk_docs = chunk_docs
        self.chunk_bytes = chunk_bytes
        self._seq = first_seq
        self._current = Chunk(seq=first_seq)

    def feed(self, item: Doc | Rejected, position: Position) -> Chunk | None:
        size = item.size if isinstance(item, Doc) else len(item.raw)
        current = self._current
        full = current.records >= self.chunk_docs or (current.records and current.nbytes + size > self.chunk_bytes)
        emitted = self._start_next() if full else None
        current = self._current
        current.add(item, size)
        current.end = position
        return emitted

    def flush(self) -> Chunk | None:
        return self._start_next() if self._current.records else None

    def _start_next(self) -> Chunk:
        done = self._current
        self._seq += 1
        self._current = Chunk(seq=self._seq)
        return done.seal()
