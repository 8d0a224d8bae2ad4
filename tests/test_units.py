"""Unit tests of the small stages: builder, chunker, reader, classifier, checkpoint, config, rate limit."""

import gzip
import hashlib
import json
import threading

import orjson
import pytest

from pushagent.cluster.classifier import CURRENT, INDEXED, PERMANENT, RETRYABLE, classify_item, request_outcome
from pushagent.cluster.ratelimit import TokenBucket
from pushagent.cluster.transport import parse_retry_after
from pushagent.config import load_config, parse_duration, parse_size
from pushagent.documents.builder import Builder, BuildSettings, Doc, Rejected, canonical_checksum
from pushagent.documents.chunker import Chunker, Position, bulk_body
from pushagent.errors import BatchLockedError, ConfigError
from pushagent.inputs.reader import describe_file, expand_inputs, read_lines
from pushagent.state.checkpoint import BatchLock, CheckpointStore, CommitTracker, RunState

pytestmark = pytest.mark.fast


def settings(**overrides):
    values = dict(id_field="ipa_id", default_index="words", index_field=None, allowed_indices=frozenset({"words"}),
                  batch_version=1700000000000, batch_time_iso="2023-11-14T22:13:20.000Z", embedding_version="v1")
    values.update(overrides)
    return BuildSettings(**values)


def test_builder_stamps_fields_and_checksums_the_record_without_them():
    doc = Builder(settings()).build(b'{"word":"ka","ipa_id":"w1","embedding_version":"old"}', "f", 3)
    assert isinstance(doc, Doc) and (doc.doc_id, doc.index, doc.line) == ("w1", "words", 3)
    source = orjson.loads(doc.source)
    assert source["embedding_version"] == "v1" and source["last_updated"] == "2023-11-14T22:13:20.000Z"
    expected = hashlib.sha256(b'{"ipa_id":"w1","word":"ka"}').hexdigest()
    assert source["sync_checksum"] == doc.checksum == expected
    assert canonical_checksum(source, settings().stamped_fields) == expected
    action = orjson.loads(doc.action)["index"]
    assert action == {"_index": "words", "_id": "w1", "version": 1700000000000, "version_type": "external"}


@pytest.mark.parametrize("raw, reason", [
    (b"{bad", "malformed JSON"),
    (b"[1]", "not a JSON object"),
    (b'{"x":1}', "missing id field"),
    (b'{"ipa_id":1.5}', "is a float"),
    (b'{"ipa_id":true}', "is a bool"),
    (b'{"ipa_id":""}', "must be 1 to 512 bytes"),
    (b'{"ipa_id":"a","v":1,"op":"delete"}', "delete refused"),
    (b'{"ipa_id":"a","v":1,"op":"upsert"}', "unknown operation"),
    (b'{"ipa_id":"a","idx":"other"}', "not in allowed_indices"),
    (b'{"ipa_id":"a","v":-1}', "must be a non-negative integer"),
])
def test_builder_rejects_with_a_reason(raw, reason):
    built = Builder(settings(op_field="op", index_field="idx", version_field="v")).build(raw, "f", 9)
    assert isinstance(built, Rejected) and reason in built.reason and built.line == 9


def test_builder_versions_from_a_field_and_deletes_when_allowed():
    builder = Builder(settings(op_field="op", version_field="v", allow_delete=True))
    doc = builder.build(b'{"ipa_id":7,"v":42,"op":"delete"}', "f", 1)
    assert (doc.doc_id, doc.version, doc.op, doc.source) == ("7", 42, "delete", None)


def make_doc(n, size=10):
    return Doc("i", str(n), 1, "index", b"a" * (size // 2), b"s" * (size - size // 2), "", "f", n)


def test_chunker_bounds_docs_and_bytes_and_keeps_rejected_lines():
    chunker = Chunker(chunk_docs=3, chunk_bytes=25)
    emitted = [chunker.feed(make_doc(n), Position(0, n, n)) for n in range(1, 8)]
    emitted.append(chunker.feed(Rejected("bad", b"xx", "f", 8), Position(0, 8, 8)))
    chunks = [c for c in emitted if c] + [chunker.flush()]
    assert [len(c.docs) for c in chunks] == [2, 2, 2, 1]
    assert [len(c.rejected) for c in chunks] == [0, 0, 0, 1]
    assert [c.end.line for c in chunks] == [2, 4, 6, 8] and [c.seq for c in chunks] == [0, 1, 2, 3]
    assert chunker.flush() is None


def test_oversized_doc_gets_a_chunk_of_its_own_and_body_is_ndjson():
    chunker = Chunker(chunk_docs=10, chunk_bytes=20)
    assert chunker.feed(make_doc(1, 50), Position(0, 1, 1)) is None
    first = chunker.feed(make_doc(2), Position(0, 2, 2))
    assert len(first.docs) == 1 and bulk_body(first.docs) == b"a" * 25 + b"s" * 25


def test_reader_offsets_resume_where_they_stopped_in_plain_and_gzip(tmp_path):
    content = b'\xef\xbb\xbf{"a":1}\n\n{"a":2}\n{"a":3}'
    for name, writer in (("x.jsonl", open), ("x.jsonl.gz", gzip.open)):
        path = tmp_path / name
        with writer(path, "wb") as handle:
            handle.write(content)
        lines = list(read_lines(describe_file(str(path))))
        assert [(l.data.strip(), l.number) for l in lines] == [(b'{"a":1}', 1), (b'{"a":2}', 3), (b'{"a":3}', 4)]
        resumed = list(read_lines(describe_file(str(path)), lines[0].end_offset, lines[0].number))
        assert [l.number for l in resumed] == [3, 4]


def test_expand_inputs_globs_and_errors(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        (tmp_path / name).write_text("{}\n")
    files = expand_inputs([str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")])
    assert [f.path.rsplit("/", 1)[1] for f in files] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(ConfigError, match="no input matches"):
        expand_inputs([str(tmp_path / "*.gz")])
    with pytest.raises(ConfigError, match="not found"):
        expand_inputs([str(tmp_path / "missing.jsonl")])


@pytest.mark.parametrize("item, expected", [
    ({"index": {"status": 201}}, INDEXED),
    ({"index": {"status": 409, "error": {"type": "version_conflict_engine_exception"}}}, CURRENT),
    ({"index": {"status": 429, "error": {"type": "x"}}}, RETRYABLE),
    ({"index": {"status": 400, "error": {"type": "es_rejected_execution_exception"}}}, RETRYABLE),
    ({"index": {"status": 400, "error": {"type": "mapper_parsing_exception", "reason": "r"}}}, PERMANENT),
    ({"delete": {"status": 404}}, INDEXED),
])
def test_classify_item(item, expected):
    assert classify_item(item)[0] == expected


def test_request_outcome_and_retry_after():
    assert [request_outcome(s) for s in (200, 401, 403, 413, 429, 503, 404)] == \
        ["ok", "auth", "auth", "too_large", "retryable", "retryable", "fatal"]
    assert parse_retry_after("7") == 7.0 and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_checkpoint_roundtrip_is_atomic_and_commit_tracker_releases_prefix(tmp_path):
    store = CheckpointStore(tmp_path)
    state = RunState("b1", [{"path": "/x"}], {"index": "i"}, Position(0, 10, 2))
    store.save(state)
    assert store.load("b1") == state
    assert json.loads(store.path("b1").read_text())["files"][0] == {"path": "/x", "offset": 10, "line": 2,
                                                                    "done": False}
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["b1.json"]
    tracker = CommitTracker(0)
    assert tracker.resolved(1, "one") == [] and tracker.resolved(0, "zero") == ["zero", "one"]


def test_batch_lock_is_exclusive(tmp_path):
    with BatchLock(tmp_path, "b"):
        with pytest.raises(BatchLockedError, match="already being pushed"):
            with BatchLock(tmp_path, "b"):
                pass
    with BatchLock(tmp_path, "b"):
        pass


def test_config_precedence_flag_over_env_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("index: from-file\nchunk_docs: 100\nconcurrency: 3\n")
    env = {"PUSHAGENT_CHUNK_DOCS": "200", "PUSHAGENT_CONCURRENCY": "4"}
    config = load_config(str(path), {"concurrency": 5}, environ=env)
    assert (config.index, config.chunk_docs, config.concurrency) == ("from-file", 200, 5)
    path.write_text("indx: typo\n")
    with pytest.raises(ConfigError, match="unknown configuration key"):
        load_config(str(path), environ={})
    assert parse_size("50MiB") == 50 * 1024**2 and parse_duration("6h") == 21600


def test_token_bucket_paces_requests():
    clock = [0.0]
    bucket = TokenBucket(60, burst=2, clock=lambda: clock[0])
    assert bucket.acquire() and bucket.acquire()
    stop = threading.Event()
    stop.set()
    assert bucket.acquire(stop) is False
    clock[0] = 1.0
    assert bucket.acquire(stop) is True


def test_record_larger_than_a_request_is_refused_before_parsing():
    built = Builder(settings(max_record_bytes=100)).build(b'{"ipa_id":"a","x":"' + b"y" * 200 + b'"}', "f", 4)
    assert isinstance(built, Rejected) and "larger than chunk_bytes" in built.reason and len(built.raw) <= 1024
