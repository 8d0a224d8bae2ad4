"""Push, drain and verify run against the in-memory cluster (tests/fakecluster.py): their logic in milliseconds.

The same runs as the CLI's, with the fake as their `cluster`; short backoffs
and a fake clock for the count's settling take the place of waiting.
"""

import sqlite3
import threading
import time

import orjson
import pytest
from fakecluster import FakeCluster, UnexpectedRequest

from pushagent.cluster import scan
from pushagent.config import Config, parse_size
from pushagent.documents.builder import canonical_checksum
from pushagent.runs import checks
from pushagent.runs.drain import DrainOptions, DrainRun
from pushagent.runs.extra import DeleteRefused
from pushagent.runs.push import PushOptions, PushRun
from pushagent.runs.verify import VerifyOptions, verify_batch
from pushagent.state.records import SyncStateStore

pytestmark = pytest.mark.fast

T1, T2 = "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"
T1_MS = 1767225600000


class FakeTime:
    """time.monotonic and time.sleep for the count's settling: a sleep moves the clock, it does not wait."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


@pytest.fixture(autouse=True)
def no_settling_waits(monkeypatch):
    monkeypatch.setattr(checks, "time", FakeTime())


@pytest.fixture
def cluster():
    return FakeCluster()


@pytest.fixture
def config(tmp_path):
    """Sends at once and backs off for milliseconds; its url leads nowhere (the fake is the cluster)."""
    return Config(url="http://127.0.0.1:9", index="words", id_field="ipa_id", state_dir=str(tmp_path / "state"),
                  embedding_version="v1", batch_time=T1, chunk_docs=10, concurrency=2, requests_per_minute=1e9,
                  retry_backoff_seconds=0.001, max_backoff_seconds=0.002, sample_size=50, grace_seconds=5)


def records(path, count, start=0, word="word", extra=()):
    """A JSONL file of `count` records w0000... (`word` in their text), then the raw `extra` lines."""
    lines = [orjson.dumps({"ipa_id": f"w{n:04d}", "word": f"{word} {n}"}) for n in range(start, start + count)]
    path.write_bytes(b"\n".join([*lines, *extra]) + b"\n")
    return path


def push(config, cluster, *inputs, **options):
    return PushRun(config, PushOptions([str(path) for path in inputs], **options), cluster=cluster).run()


def verify(config, cluster, batch_id, **options):
    return verify_batch(config, VerifyOptions(batch_id=batch_id, **options), cluster)


def queue_rows(config, status):
    with sqlite3.connect(config.state_path / "queue.db") as db:
        return db.execute("SELECT doc_id, line, last_error FROM items WHERE status = ? ORDER BY doc_id",
                          (status,)).fetchall()


def refuse_until_queued(config, cluster, ids) -> None:
    """The push queues `ids` (of the first chunk): w0000, taken at its second attempt, makes that attempt a
    round of in-run retries, the only one max_retries allows; an attempt whose every item is refused would
    be a pause instead, within the outage budget."""
    config.max_retries = 1
    cluster.fail_ids(["w0000"], times=1)
    cluster.fail_ids(ids, times=2)


def words(cluster, index="words"):
    return {doc_id: doc.source["word"] for doc_id, doc in cluster.live(index).items()}


# --- push ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [True, False])
def test_a_clean_batch_lands_whole_with_its_checksums_and_verifies(config, tmp_path, compress):
    cluster, config.compress = FakeCluster(), compress
    result = push(config, cluster, records(tmp_path / "a.jsonl", 25))
    assert (result.status, result.exit_code) == ("verified", 0), result.report()
    assert result.batch.read == result.batch.indexed == 25 and sorted(cluster.bulk_sizes) == [5, 10, 10]
    stored = cluster.live("words")
    assert {doc.version for doc in stored.values()} == {T1_MS}
    assert all(doc.source["sync_checksum"] == canonical_checksum(doc.source, ("embedding_version", "last_updated",
                                                                               "sync_checksum", "sync_batch"))
               for doc in stored.values())
    assert (result.stats.bytes_sent < result.stats.bytes_raw) is compress
    assert SyncStateStore(config.state_path).load(result.batch_id)["status"] == "verified"


def test_refused_items_are_retried_in_the_run_then_queued_or_dead_lettered(config, cluster, tmp_path):
    refuse_until_queued(config, cluster, ["w0002"])
    cluster.fail_ids(["w0003"], status=400, error_type="mapper_parsing_exception")
    result = push(config, cluster, records(tmp_path / "a.jsonl", 25))
    batch = result.batch
    assert (batch.indexed, batch.queued, batch.dead, result.exit_code) == (23, 1, 1, 3), result.report()
    assert result.status == "pushed" and result.verification is None      # verified after `drain`
    assert result.stats.retries == 1 and "w0000" in cluster.live("words")
    assert [row[:2] for row in queue_rows(config, "pending")] == [("w0002", 3)]
    assert "mapper_parsing_exception" in queue_rows(config, "dead")[0][2]


def test_a_read_only_block_503s_and_429s_are_ridden_out(config, cluster, tmp_path):
    cluster.block_writes(requests=2)
    cluster.fail_requests(503, times=2)
    cluster.fail_requests(429, retry_after=0)
    cluster.fail_requests(None)                                                 # a connection refused
    result = push(config, cluster, records(tmp_path / "a.jsonl", 25))
    assert (result.status, result.batch.indexed) == ("verified", 25), result.report()
    assert result.stats.statuses["503"] == 2 and result.stats.statuses["429"] == 1
    assert result.stats.rate_per_minute < config.requests_per_minute            # the push-back slowed the bucket


def test_an_outage_past_its_budget_stops_the_run_with_the_checkpoint_kept(config, cluster, tmp_path):
    config.outage_seconds = 0.05
    cluster.fail_requests(503, times=10_000)
    result = push(config, cluster, records(tmp_path / "a.jsonl", 25))
    assert result.status == "failed" and "outage_seconds" in str(result.error)
    assert result.batch.read == 0 and len(cluster.live("words")) == 0


def test_a_refused_key_stops_the_run_with_exit_4(config, cluster, tmp_path):
    cluster.fail_requests(403)
    result = push(config, cluster, records(tmp_path / "a.jsonl", 25))
    assert (result.status, result.exit_code) == ("failed", 4)


def test_a_missing_index_the_cluster_will_not_create_stops_the_run(config, cluster, tmp_path):
    cluster.auto_create = False
    result = push(config, cluster, records(tmp_path / "a.jsonl", 5))
    assert (result.status, result.exit_code) == ("failed", 2) and "does not exist" in str(result.error)


def test_a_413_splits_the_request_down_to_the_oversized_document(config, cluster, tmp_path):
    cluster.max_request_bytes = 700
    huge = orjson.dumps({"ipa_id": "huge", "word": "x" * 2000})
    result = push(config, cluster, records(tmp_path / "a.jsonl", 12, extra=[huge]))
    assert (result.batch.indexed, result.batch.dead) == (12, 1), result.report()
    assert queue_rows(config, "dead")[0][:2] == ("huge", 13)
    assert max(size for size in cluster.bulk_sizes) == 10 and 1 in cluster.bulk_sizes


def test_unreadable_lines_are_quarantined_with_their_line_numbers(config, cluster, tmp_path):
    result = push(config, cluster, records(tmp_path / "a.jsonl", 5, extra=[b"{not json", b'{"word": "no id"}']))
    assert (result.batch.read, result.batch.indexed, result.batch.quarantined) == (7, 5, 2)
    assert result.exit_code == 3 and result.status == "verified"
    with sqlite3.connect(config.state_path / "queue.db") as db:
        assert db.execute("SELECT line, kind FROM items ORDER BY line").fetchall() == [(6, "quarantined"),
                                                                                       (7, "quarantined")]


def test_an_interrupted_push_resumes_from_its_checkpoint(config, cluster, tmp_path):
    data = records(tmp_path / "a.jsonl", 30)
    config.chunk_docs, config.concurrency, config.max_concurrency = 5, 1, 1
    stop = threading.Event()
    cluster.after_bulk = lambda number: number == 2 and stop.set()
    first = PushRun(config, PushOptions([str(data)]), stop_event=stop, cluster=cluster).run()
    assert (first.status, first.exit_code) == ("interrupted", 75) and 0 < first.batch.read < 30
    cluster.after_bulk = None
    second = push(config, cluster, data)
    assert (second.status, second.batch.read, second.batch.indexed) == ("verified", 30, 30), second.report()
    assert second.this_run.read == 30 - first.batch.read
    assert sum(cluster.bulk_sizes) <= 30 + config.concurrency * config.chunk_docs   # at most the uncommitted again


def test_a_stop_holds_back_no_chunk_ahead_of_one_that_left(config, cluster, tmp_path, monkeypatch):
    """The first chunk's worker reaches the rate limit late; the stop comes with the first answer. The later
    chunk must not have left before it: its answer could not be committed, and the next run would send it
    again. (It may leave while the first is out: then both are answered and committed.)"""
    data = records(tmp_path / "a.jsonl", 30)
    config.chunk_docs, config.concurrency, config.max_concurrency = 5, 2, 2
    resolve_chunk = PushRun._resolve_chunk

    def first_chunk_late(run, chunk, turn):
        if chunk.seq == 0:
            time.sleep(0.2)
        return resolve_chunk(run, chunk, turn)
    monkeypatch.setattr(PushRun, "_resolve_chunk", first_chunk_late)
    stop = threading.Event()
    cluster.after_bulk = lambda number: stop.set()
    first = PushRun(config, PushOptions([str(data)]), stop_event=stop, cluster=cluster).run()
    assert first.status == "interrupted" and 0 < first.batch.indexed == sum(cluster.bulk_sizes), first.report()
    cluster.after_bulk = None
    second = push(config, cluster, data)
    assert (second.status, second.batch.indexed) == ("verified", 30), second.report()
    assert sum(cluster.bulk_sizes) == 30, cluster.bulk_sizes    # nothing sent twice


def most_requests_at_once(cluster) -> list:
    """Makes each bulk request of `cluster` last a little; the list gets the most that were out at once."""
    out, most, lock, bulk = [0], [0], threading.Lock(), cluster.bulk

    def slow_bulk(payload):
        with lock:
            out[0] += 1
            most[0] = max(most[0], out[0])
        time.sleep(0.01)
        try:
            return bulk(payload)
        finally:
            with lock:
                out[0] -= 1
    cluster.bulk = slow_bulk
    return most


@pytest.mark.parametrize("budget, most", [("1KiB", 1), ("64MiB", 4)])
def test_max_in_flight_bytes_holds_chunks_back_one_always_goes(config, cluster, tmp_path, budget, most):
    config.concurrency, config.max_concurrency, config.compress = 4, 4, False
    config.max_in_flight_bytes = parse_size(budget)      # a chunk of 10 of these documents is ~2.5 KiB
    seen = most_requests_at_once(cluster)
    result = push(config, cluster, records(tmp_path / "a.jsonl", 200))
    assert (result.status, result.batch.indexed) == ("verified", 200)
    assert seen[0] == most if most == 1 else seen[0] > 1, seen


def test_a_later_batch_supersedes_the_first_and_replaying_the_first_regresses_nothing(config, cluster, tmp_path):
    first = push(config, cluster, records(tmp_path / "a.jsonl", 25), batch_id="a")
    config.batch_time = T2
    push(config, cluster, records(tmp_path / "b.jsonl", 10, word="newer"), batch_id="b")
    report, code = verify(config, cluster, first.batch_id)
    count = report["verification"]["count"]
    assert code == 0 and (count["actual"], count["superseded"]) == (15, 10), report
    config.batch_time = T1
    again = push(config, cluster, records(tmp_path / "a.jsonl", 25), batch_id="a", restart=True, verify=False)
    assert (again.batch.indexed, again.batch.current) == (0, 25)             # 409s: the cluster holds ours or newer
    assert words(cluster)["w0003"] == "newer 3" and words(cluster)["w0020"] == "word 20"


def test_deletes_remove_documents_and_verify_expects_them_absent(config, cluster, tmp_path):
    push(config, cluster, records(tmp_path / "a.jsonl", 10), batch_id="a")
    config.batch_time, config.op_field, config.allow_delete = T2, "op", True
    deletes = [orjson.dumps({"ipa_id": f"w{n:04d}", "op": "delete"}) for n in (2, 4, 6)]
    result = push(config, cluster, records(tmp_path / "b.jsonl", 0, extra=deletes), batch_id="b")
    assert (result.status, result.batch.indexed) == ("verified", 3), result.report()
    assert sorted(cluster.live("words")) == [f"w{n:04d}" for n in (0, 1, 3, 5, 7, 8, 9)]
    report, code = verify(config, cluster, "a")
    assert code == 0 and report["verification"]["count"]["superseded"] == 3, report


def test_a_repeated_id_ends_with_its_later_line_at_any_concurrency(config, cluster, tmp_path):
    config.chunk_docs = 3
    repeat = orjson.dumps({"ipa_id": "w0001", "word": "the later line"})
    result = push(config, cluster, records(tmp_path / "a.jsonl", 20, extra=[repeat]))
    assert (result.status, result.duplicates) == ("verified", 1), result.report()
    assert words(cluster)["w0001"] == "the later line"


def test_incremental_sends_only_what_changed(config, cluster, tmp_path):
    push(config, cluster, records(tmp_path / "a.jsonl", 20), batch_id="a")
    config.batch_time, config.incremental = T2, True
    changed = [orjson.dumps({"ipa_id": f"w{n:04d}", "word": "changed"}) for n in range(15, 20)]
    result = push(config, cluster, records(tmp_path / "b.jsonl", 15, extra=changed), batch_id="b")
    batch = result.batch
    assert (result.status, batch.read, batch.unchanged, batch.indexed) == ("verified", 20, 15, 5), result.report()
    assert result.verification["count"]["unchanged"] == 15 and result.stats.probes == 2
    assert {doc.version for doc in cluster.live("words").values()} == {T1_MS, T1_MS + 2_678_400_000}


def test_incremental_chunks_that_wait_for_room_keep_their_bytes_for_the_probe(config, cluster, tmp_path):
    push(config, cluster, records(tmp_path / "a.jsonl", 20), batch_id="a")
    config.batch_time, config.incremental, config.compress = T2, True, True
    config.chunk_docs, config.concurrency, config.max_concurrency = 4, 1, 1     # every chunk waits for room
    lines = [orjson.dumps({"ipa_id": f"w{n:04d}", "word": "changed" if n % 3 == 0 else f"word {n}"})
             for n in range(20)]
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result = push(config, cluster, tmp_path / "b.jsonl", batch_id="b")
    assert (result.status, result.batch.unchanged, result.batch.indexed) == ("verified", 13, 7), result.report()
    assert sorted(n for n, doc in enumerate(sorted(words(cluster).items())) if doc[1] == "changed") == \
        list(range(0, 20, 3))


def test_incremental_sends_the_whole_chunk_when_the_cluster_cannot_say(config, cluster, tmp_path, caplog):
    push(config, cluster, records(tmp_path / "a.jsonl", 10), batch_id="a")
    config.batch_time, config.incremental = T2, True
    cluster.fail_reads("_mget")
    result = push(config, cluster, records(tmp_path / "a.jsonl", 10), batch_id="b")
    assert (result.batch.unchanged, result.batch.indexed) == (0, 10)
    assert "could not ask the cluster what it holds" in caplog.text


def test_a_dry_run_writes_the_requests_and_reaches_for_no_cluster(config, tmp_path):
    result = PushRun(config, PushOptions([str(records(tmp_path / "a.jsonl", 25))], dry_run=str(tmp_path / "dry"))).run()
    assert (result.status, result.report()["would_send"]) == ("dry_run", 25)
    assert len(list((tmp_path / "dry").glob("request-*.ndjson"))) == 3


# --- drain --------------------------------------------------------------------------------------------------

def test_drain_sends_what_the_push_queued_and_empties_the_queue(config, cluster, tmp_path):
    refuse_until_queued(config, cluster, ["w0002", "w0005"])
    pushed = push(config, cluster, records(tmp_path / "a.jsonl", 25))
    assert pushed.batch.queued == 2 and "w0002" not in cluster.live("words")
    result = DrainRun(config, DrainOptions(all=True), cluster=cluster).run()
    assert (result.status, result.exit_code, result.ledger.indexed, result.acked) == ("drained", 0, 2, 2)
    assert result.remaining == {"due": 0, "later": 0, "leased": 0, "dead": 0}
    assert queue_rows(config, "pending") == [] and len(cluster.live("words")) == 25
    assert verify(config, cluster, pushed.batch_id)[1] == 0


def test_drain_dead_letters_what_the_cluster_now_refuses_for_good(config, cluster, tmp_path):
    refuse_until_queued(config, cluster, ["w0002"])
    push(config, cluster, records(tmp_path / "a.jsonl", 5))
    cluster.fail_ids(["w0002"], status=400, error_type="mapper_parsing_exception")
    result = DrainRun(config, DrainOptions(all=True), cluster=cluster).run()
    assert (result.status, result.exit_code, result.ledger.dead) == ("incomplete", 3, 1), result.report()
    assert result.remaining["dead"] == 1 and queue_rows(config, "dead")[0][0] == "w0002"


def test_a_repair_wins_over_an_edit_and_a_delete_made_by_hand(config, cluster, tmp_path):
    pushed = push(config, cluster, records(tmp_path / "a.jsonl", 10))
    assert cluster.write_by_hand("words", "w0003", {"ipa_id": "w0003", "word": "edited"}) == T1_MS + 1
    cluster.delete_by_hand("words", "w0006")                                  # a tombstone at T1 + 1
    report, code = verify(config, cluster, pushed.batch_id, full=True, repair=True)
    full = report["verification"]["full"]
    assert code == 3 and (full["mismatched_ids"], full["missing_ids"], report["enqueued"]) == (
        ["w0003"], ["w0006"], 2)
    result = DrainRun(config, DrainOptions(all=True), cluster=cluster).run()
    assert (result.status, result.ledger.indexed) == ("drained", 2), result.report()
    assert words(cluster)["w0003"] == "word 3" and cluster.live("words")["w0006"].version == T1_MS + 1
    assert verify(config, cluster, pushed.batch_id, full=True)[1] == 0


# --- verify -------------------------------------------------------------------------------------------------

def test_verify_finds_a_missing_document_by_count_and_sample(config, cluster, tmp_path):
    pushed = push(config, cluster, records(tmp_path / "a.jsonl", 20))
    cluster.delete_by_hand("words", "w0007")
    report, code = verify(config, cluster, pushed.batch_id)
    verification = report["verification"]
    assert code == 3 and verification["count"]["missing_ids"] == ["w0007"], report
    assert verification["sample"]["missing"] == ["w0007"] and verification["timestamp"]["ok"]
    assert SyncStateStore(config.state_path).load(pushed.batch_id)["status"] == "verification_failed"


def test_verify_finds_documents_left_behind_by_an_earlier_batch_time(config, cluster, tmp_path):
    pushed = push(config, cluster, records(tmp_path / "a.jsonl", 5))
    stale = {**cluster.live("words")["w0001"].source, "last_updated": "2025-01-01T00:00:00.000Z"}
    cluster.write_by_hand("words", "w0001", stale)
    timestamp = verify(config, cluster, pushed.batch_id)[0]["verification"]["timestamp"]
    assert (timestamp["older"], timestamp["ids"]) == (1, ["w0001"])


def test_verification_asks_for_a_mapped_keyword_field_itself(config, cluster, tmp_path):
    cluster.mappings["words"] = {"sync_batch": "keyword", "embedding_version": "keyword"}
    result = push(config, cluster, records(tmp_path / "a.jsonl", 5))
    assert result.status == "verified" and result.verification["count"]["actual"] == 5


@pytest.mark.parametrize("fake, snapshot_api", [
    (dict(), "_search/point_in_time"), (dict(shards=3), "_search/point_in_time"),
    (dict(version="2.3.0"), "_search/scroll"), (dict(distribution="elasticsearch", version="8.15.0"), "_pit")])
def test_a_full_scan_finds_missing_extra_and_mismatched_documents(config, tmp_path, monkeypatch, fake, snapshot_api):
    monkeypatch.setattr(scan, "PAGE_SIZE", 4)
    cluster = FakeCluster(**fake)
    pushed = push(config, cluster, records(tmp_path / "a.jsonl", 20))
    cluster.delete_by_hand("words", "w0001")
    cluster.write_by_hand("words", "w0002", {"ipa_id": "w0002", "word": "edited"})
    cluster.write_by_hand("words", "x0001", {"ipa_id": "x0001", "word": "extra"})
    full = verify(config, cluster, pushed.batch_id, full=True)[0]["verification"]["full"]
    assert (full["scanned"], full["missing_ids"], full["extra_ids"], full["mismatched_ids"]) == (
        20, ["w0001"], ["x0001"], ["w0002"]), full
    assert any(snapshot_api in path for _, path in cluster.reads)


def test_delete_extra_is_guarded_then_deletes_what_a_snapshot_dropped(config, cluster, tmp_path):
    config.snapshot = True
    pushed = push(config, cluster, records(tmp_path / "a.jsonl", 40))
    for n in range(3):                                                         # 3 of 40: above 5 %
        cluster.write_by_hand("words", f"x{n}", {"ipa_id": f"x{n}", "word": "dropped", "embedding_version": "v1"})
    with pytest.raises(DeleteRefused, match="allow_delete"):
        verify(config, cluster, pushed.batch_id, full=True, delete_extra=True)
    config.allow_delete = True
    with pytest.raises(DeleteRefused, match="max_delete_fraction"):
        verify(config, cluster, pushed.batch_id, full=True, delete_extra=True)
    assert len(cluster.live("words")) == 43
    report, code = verify(config, cluster, pushed.batch_id, full=True, delete_extra=True, force=True)
    assert report["deleted_extra"]["deleted"] == 3 and sorted(cluster.live("words")) == sorted(words(cluster))
    assert len(cluster.live("words")) == 40 and verify(config, cluster, pushed.batch_id, full=True)[1] == 0


# --- the fake itself ------------------------------------------------------------------------------------------

def test_the_fake_refuses_requests_it_does_not_know(cluster):
    with pytest.raises(UnexpectedRequest):
        cluster.client().request("GET", "/_cat/indices")
    cluster.write_by_hand("words", "w1", {"word": "ka"})
    with pytest.raises(UnexpectedRequest, match="text field"):
        cluster.client().request("POST", "/words/_count", {"query": {"term": {"word": "ka"}}})
