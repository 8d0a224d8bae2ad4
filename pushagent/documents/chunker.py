"""Group built documents into bulk requests of at most chunk_docs and chunk_bytes.

A chunk also carries the quarantined lines met while it was filled and the
input position after its last line, so resolving the chunk resolves every
line up to that position (the checkpoint commits exactly that).

A chunk keeps one copy of its documents' bytes: each fed document is
appended to the chunk's NDJSON body, and once the chunk is full its
documents' `action` and `source` become zero-copy views of that body. The
first request sends the body as it is; only a retry of a subset joins views.

While its request is out gzip'd, a chunk holds the gzip'd body instead
(pack): about 2.4x fewer bytes for embeddings, and the views are dropped
with it. Most answers take every document and the chunk is never unpacked;
a retry, a split or a document to queue gets its bytes back (unpack).
"""

import array
import dataclasses
from typing import Callable, NamedTuple

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
    body: bytes | bytearray | None = dataclasses.field(default_factory=bytearray)
    packed: bytes | None = None  # the body gzip'd, held instead of it while packed
    body_bytes: int = 0          # the length of the body, packed or not
    lines_bytes: int = 0         # input lines its documents not built yet hold (Builder.known), outside the body
    _spans: array.array = dataclasses.field(default_factory=lambda: array.array("Q"))
    seconds: float = 0.0         # time its worker spent resolving it, for logs and metrics

    @property
    def records(self) -> int:
        return len(self.docs) + len(self.rejected)

    @property
    def held_bytes(self) -> int:
        """The bytes of its body as it holds it now, packed or plain (read by another thread than packs it:
        pack sets `packed` before it drops `body`, unpack sets `body` first), and of its unbuilt lines."""
        return len(self.packed or self.body or b"") + self.lines_bytes

    def add(self, item: Doc | Rejected, size: int) -> None:
        if isinstance(item, Doc):
            body = self.body
            body += item.action
            self._spans.append(len(body))
            if item.source:
                body += item.source
            elif item.raw:
                self.lines_bytes += len(item.raw)
            self._spans.append(len(body))
            item.action = item.source = None  # the body holds them now
            self.docs.append(item)
        else:
            self.rejected.append(item)
        self.nbytes += size

    def rewrite(self) -> None:
        """Build the body again after documents changed their action lines (see Doc.win_equal_version)."""
        docs, nbytes = self.docs, self.nbytes
        self.docs, self.body, self._spans, self.lines_bytes = [], bytearray(), array.array("Q"), 0
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
        self.body_bytes = len(self.body)
        return self

    def pack(self, gzip: Callable[[bytes], bytes]) -> bytes:
        """The body gzip'd by `gzip`; from now on the chunk holds only that (and its documents no bytes)
        until unpack()."""
        if self.packed is None:
            self.packed = gzip(self.body)
            for doc in self.docs:
                doc.action = doc.source = None
            self.body = None
        return self.packed

    def unpack(self, gunzip: Callable[[bytes], bytes]) -> bytes | bytearray:
        """The plain body, gunzip'd by `gunzip` if packed; the documents' views point into it again."""
        if self.body is None:
            self.body, self.packed = gunzip(self.packed), None
            self.seal()
        return self.body


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
