"""A chunk sent gzip'd holds only its gzip'd body while the request is out; a retry, a split or a refused document
gets its bytes back."""

import gzip
import threading

import orjson
import pytest
from test_adaptive_units import Unlimited

from pushagent.cluster.bulk import ChunkSender
from pushagent.cluster.transport import BulkResponse, TransferStats, gunzip_body, gzip_body
from pushagent.config import Config
from pushagent.documents.builder import BuildSettings, Builder
from pushagent.documents.chunker import Chunker, Position, bulk_body

pytestmark = pytest.mark.fast

SETTINGS = BuildSettings(id_field="id", default_index="words", index_field=None, allowed_indices=frozenset({"words"}),
                         batch_version=1700000000000, batch_time_iso="2023-11-14T22:13:20Z")


def chunk_of(count: int):
    builder, chunker = Builder(SETTINGS), Chunker(chunk_docs=count, chunk_bytes=1 << 30)
    for n in range(count):
        doc = builder.build(orjson.dumps({"id": f"w{n}", "word": "ka" * n, "embedding": [n / 7] * 16}), "f", n + 1)
        chunker.feed(doc, Position(0, n, n + 1))
    return chunker.flush()


class Recording:
    """A transport that keeps each plain body it got and answers from `answer(ids)`, a list of item statuses."""

    def __init__(self, *answers):
        self.answers, self.bodies, self.encodings = list(answers), [], []

    def post(self, payload, docs=0, gzip=False, raw_bytes=None):
        body = gunzip_body(payload) if gzip else bytes(payload)
        self.bodies.append(body)
        self.encodings.append(gzip)
        statuses = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return BulkResponse(200, [{"index": {"status": status, **({"error": {"type": "x", "reason": "x"}}
                                                                    if status >= 300 else {})}}
                                  for status in statuses(docs)])


def sender(transport, compress=True):
    config = Config(compress=compress, retry_backoff_seconds=0.0, max_backoff_seconds=0.0, max_retries=1)
    return ChunkSender(transport, config, TransferStats(), Unlimited(), threading.Event())


def test_pack_drops_the_body_and_unpack_gives_the_same_bytes_and_views_back():
    chunk = chunk_of(50)
    body = bytes(chunk.body)
    actions = [bytes(doc.action) for doc in chunk.docs]
    packed = chunk.pack(lambda raw: gzip_body(raw, 1))
    assert chunk.body is None and all(doc.action is None and doc.source is None for doc in chunk.docs)
    assert gzip.decompress(packed) == body and len(packed) < len(body) == chunk.body_bytes
    assert chunk.pack(lambda raw: pytest.fail("packed twice")) is packed
    assert bytes(chunk.unpack(gunzip_body)) == body and chunk.packed is None
    assert [bytes(doc.action) for doc in chunk.docs] == actions and bulk_body(chunk.docs) == body


def test_a_chunk_all_taken_stays_packed_the_body_sent_was_the_chunks():
    chunk = chunk_of(40)
    body = bytes(chunk.body)
    transport = Recording(lambda docs: [201] * docs)
    outcome = sender(transport).resolve(chunk.docs, chunk)
    assert len(outcome.indexed) == 40 and transport.bodies == [body] and transport.encodings == [True]
    assert chunk.body is None and chunk.packed is not None    # held gzip'd until committed, never unpacked


def test_the_items_retried_go_as_their_own_ndjson_and_those_left_have_their_bytes():
    chunk = chunk_of(30)
    expected = {doc.doc_id: bytes(doc.action) + bytes(doc.source) for doc in chunk.docs}
    first = lambda docs: [429 if n % 3 == 0 else 400 if n % 3 == 1 else 201 for n in range(docs)]
    half_again = lambda docs: [201 if n < docs // 2 else 429 for n in range(docs)]
    transport = Recording(first, half_again)     # half of the retried ones refused again: max_retries (1) is out
    outcome = sender(transport).resolve(chunk.docs, chunk)
    retried = [doc for n, doc in enumerate(chunk.docs) if n % 3 == 0]
    assert transport.bodies[1] == b"".join(expected[doc.doc_id] for doc in retried)
    assert [doc.doc_id for doc, _ in outcome.retry] == [doc.doc_id for doc in retried[5:]]
    assert len(outcome.dead) == 10 and len(outcome.indexed) == 15
    for doc, _ in outcome.retry + outcome.dead:     # to the retry queue, with the bytes that were sent
        assert bytes(doc.action) + bytes(doc.source) == expected[doc.doc_id]


def test_a_413_splits_the_chunk_from_its_bytes():
    chunk = chunk_of(8)
    body = bytes(chunk.body)

    class TooLargeFirst(Recording):
        def post(self, payload, docs=0, gzip=False, raw_bytes=None):
            if not self.bodies:
                self.bodies.append(gunzip_body(payload))
                return BulkResponse(413, None, None, "too large")
            return super().post(payload, docs, gzip, raw_bytes)
    transport = TooLargeFirst(lambda docs: [201] * docs)
    outcome = sender(transport).resolve(chunk.docs, chunk)
    assert len(outcome.indexed) == 8 and b"".join(transport.bodies[1:]) == body and len(transport.bodies) == 3


def test_a_plain_request_sends_the_body_as_it_is():
    chunk = chunk_of(10)
    body = bytes(chunk.body)
    transport = Recording(lambda docs: [201] * docs)
    sender(transport, compress=False).resolve(chunk.docs, chunk)
    assert transport.bodies == [body] and transport.encodings == [False] and chunk.packed is None


@pytest.mark.parametrize("compress, packed", [(True, True), (False, False)])
def test_a_chunk_waiting_for_room_is_packed_while_it_waits_if_gzip_is_in_use(compress, packed):
    chunk = chunk_of(20)
    body = bytes(chunk.body)
    transport = Recording(lambda docs: [201] * docs)
    chunk_sender = sender(transport, compress=compress)
    chunk_sender.pack_while_waiting(chunk)
    assert (chunk.packed is not None, chunk.held_bytes < len(body)) == (packed, packed)
    chunk_sender.resolve(chunk.docs, chunk)
    assert transport.bodies == [body] and transport.encodings == [compress]


def test_a_waiting_chunk_stays_plain_when_a_probe_of_compress_auto_is_due():
    clock = [0.0]

    class Slow(Recording):
        """Plain requests take twice as long: a link that gzip pays on."""

        def post(self, payload, docs=0, gzip=False, raw_bytes=None):
            clock[0] += 1.0 if gzip else 2.0
            return super().post(payload, docs, gzip, raw_bytes)
    transport = Slow(lambda docs: [201] * docs)
    config = Config(compress="auto", retry_backoff_seconds=0.0, max_backoff_seconds=0.0)
    chunk_sender = ChunkSender(transport, config, TransferStats(), Unlimited(), threading.Event(),
                               clock=lambda: clock[0])
    due = chunk_of(5)
    chunk_sender.pack_while_waiting(due)                 # the first requests of a push are probes
    assert due.packed is None
    for _ in range(4):
        chunk = chunk_of(5)
        chunk_sender.resolve(chunk.docs, chunk)
    later = chunk_of(5)
    chunk_sender.pack_while_waiting(later)               # probes done, gzip kept: it goes gzip'd
    assert later.packed is not None and transport.encodings == [True, False, True, False]


def test_the_lines_of_documents_not_built_yet_count_in_what_a_chunk_holds():
    """push --incremental keeps the input line of a document an earlier batch built until the cluster says
    whether to send it: those bytes are held too, under max_in_flight_bytes, and counted once after a rewrite."""
    builder, chunker = Builder(SETTINGS), Chunker(chunk_docs=10, chunk_bytes=1 << 30)
    lines = [orjson.dumps({"id": f"w{n}", "embedding": [n / 7] * 64}) for n in range(10)]
    for n, raw in enumerate(lines):
        chunker.feed(builder.known(raw, "f", n + 1, b"digest", "words", f"w{n}", "checksum", 1), Position(0, n, n + 1))
    chunk = chunker.flush()
    lines_bytes = sum(map(len, lines))
    assert chunk.held_bytes == len(chunk.body) + lines_bytes and len(chunk.body) < lines_bytes
    chunk.rewrite()
    assert chunk.held_bytes == len(chunk.body) + lines_bytes
