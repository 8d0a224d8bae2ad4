"""Group built documents into bulk requests of at most chunk_docs and chunk_bytes.

A chunk also carries the quarantined lines met while it was filled and the
input position after its last line, so resolving the chunk resolves every
line up to that position (the checkpoint commits exactly that).
"""

import dataclasses
from typing import NamedTuple

from .builder import Doc, Rejected


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
    seconds: float = 0.0         # time its worker spent resolving it, for logs and metrics

    @property
    def records(self) -> int:
        return len(self.docs) + len(self.rejected)


def bulk_body(docs) -> bytes:
    """The NDJSON body of a _bulk request for `docs`."""
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
        (current.docs if isinstance(item, Doc) else current.rejected).append(item)
        current.nbytes += size
        current.end = position
        return emitted

    def flush(self) -> Chunk | None:
        return self._start_next() if self._current.records else None

    def _start_next(self) -> Chunk:
        done = self._current
        self._seq += 1
        self._current = Chunk(seq=self._seq)
        return done
