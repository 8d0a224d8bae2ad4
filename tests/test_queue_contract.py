"""One contract suite for the retry queue, run on real SQLite and a real redis-server."""

import threading
import time

import pytest

from pushagent.errors import QueueError
from pushagent.state.retry_queue import QueueItem, open_queue, retry_delay
from pushagent.state.retry_queue.base import DEAD, PENDING, redact_url

MAX_ATTEMPTS, MAX_DELAY = 3, 300.0


@pytest.fixture
def open_test_queue(queue_url):
    """Opens queues on the test's backend (several = several drainers); closes them at the end."""
    opened = []

    def opener():
        opened.append(open_queue(queue_url, MAX_ATTEMPTS, MAX_DELAY))
        return opened[-1]
    yield opener
    for queue in opened:
        queue.close()


@pytest.fixture
def queue(open_test_queue):
    return open_test_queue()


def doc_item(n: int, batch: str = "b1", version: int = 100, due: bool = True, kind: str = "retryable"):
    return QueueItem(QueueItem.document_key("words", f"w{n}"), batch, "words", f"w{n}", version, "index",
                     b'{"ipa_id":"w%d","word":"\xc3\xa9"}\n' % n, "/data/words.jsonl", n + 1, kind,
                     "429 es_rejected_execution_exception", 0, 1.0 if due else time.time() + 3600)


def quarantined(n: int, batch: str = "b1"):
    return QueueItem(QueueItem.line_key(batch, "/data/words.jsonl", n), batch, None, None, None, None,
                     b"{not json\xff", "/data/words.jsonl", n, "quarantined", "malformed JSON")


def keys(items) -> set:
    return {item.key for item in items}


def test_an_item_keeps_everything_needed_to_resend_it(queue):
    queue.put([doc_item(1)])
    (taken,) = queue.take(10)
    expected = doc_item(1)
    for field in ("key", "batch_id", "index", "doc_id", "version", "op", "source", "input_file", "line", "kind",
                  "last_error", "attempts"):
        assert getattr(taken, field) == getattr(expected, field), field
    assert taken.status == PENDING and taken.lease


def test_take_leases_due_items_only_unless_all(queue):
    queue.put([doc_item(n) for n in range(3)] + [doc_item(n, due=False) for n in range(3, 5)])
    assert keys(queue.take(10)) == {f"words/w{n}" for n in range(3)}
    assert queue.take(10) == []
    assert keys(queue.take(10, due_only=False)) == {"words/w3", "words/w4"}


def test_take_respects_limit_and_batch(queue):
    queue.put([doc_item(n, batch="b1") for n in range(5)] + [doc_item(n, batch="b2") for n in range(5, 9)])
    assert len(queue.take(3)) == 3
    taken = queue.take(10, batch_id="b2")
    assert keys(taken) == {f"words/w{n}" for n in range(5, 9)}


def test_concurrent_takers_never_share_an_item(open_test_queue):
    open_test_queue().put([doc_item(n) for n in range(400)])
    queues = [open_test_queue() for _ in range(4)]
    results = [[] for _ in queues]

    def drain(queue, out):
        while batch := queue.take(7):
            out.extend(item.key for item in batch)
    threads = [threading.Thread(target=drain, args=pair) for pair in zip(queues, results)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    taken = [key for result in results for key in result]
    assert len(taken) == len(set(taken)) == 400


def test_ack_removes_and_only_the_lease_holder_may_ack(queue):
    queue.put([doc_item(n) for n in range(4)])
    first = queue.take(4, lease_seconds=0.3)
    time.sleep(0.5)  # the first drainer "died": its lease expired
    second = queue.take(4)
    assert keys(second) == keys(first)
    assert queue.ack(first) == 0
    assert queue.ack(second) == 4
    assert queue.ack(second) == 0
    assert queue.stats()["pending"] == 0 and queue.list() == []


def test_fail_counts_attempts_delays_and_dead_letters_at_max_attempts(queue):
    queue.put([doc_item(1)])
    for attempt in range(1, MAX_ATTEMPTS + 1):
        (item,) = queue.take(1, due_only=False)
        item.last_error = f"attempt {attempt} failed"
        before = time.time()
        assert queue.fail([item]) == 1
        (stored,) = queue.list()
        assert stored.attempts == attempt and stored.last_error == f"attempt {attempt} failed"
        if attempt < MAX_ATTEMPTS:
            assert stored.status == PENDING
            delay = min(MAX_DELAY, retry_delay(attempt, MAX_DELAY))
            assert before + delay - 1 <= stored.next_attempt_at <= time.time() + delay + 1
    assert stored.status == DEAD
    assert queue.take(1, due_only=False) == []


@pytest.mark.fast
def test_retry_delay_doubles_and_is_capped():
    assert [retry_delay(n, 6 * 3600) for n in range(4)] == [60, 120, 240, 480]
    assert retry_delay(30, 6 * 3600) == 6 * 3600


def test_permanent_failure_is_dead_at_once_and_release_changes_nothing(queue):
    queue.put([doc_item(1), doc_item(2)])
    first, second = sorted(queue.take(2), key=lambda item: item.key)
    first.last_error = "400 mapper_parsing_exception: bad"
    assert queue.fail([first], permanent=True) == 1
    assert queue.release([second]) == 1
    dead, = queue.list(DEAD)
    assert (dead.key, dead.attempts, dead.last_error) == ("words/w1", 1, "400 mapper_parsing_exception: bad")
    (again,) = queue.take(5)
    assert (again.key, again.attempts) == ("words/w2", 0)


def test_newer_version_replaces_older_never(queue):
    queue.put([doc_item(1, version=200)])
    queue.put([doc_item(1, version=100)])
    (item,) = queue.list()
    assert item.version == 200
    taken = queue.take(1)
    queue.put([doc_item(1, version=300)])  # replaces the leased one: its lease ends
    assert queue.ack(taken) == 0
    (item,) = queue.take(1)
    assert item.version == 300


def test_requeue_dead_keeps_quarantined_lines_dead(queue):
    queue.dead_letter([doc_item(1, kind="permanent"), quarantined(7)])
    assert queue.take(10, due_only=False) == []
    assert queue.requeue_dead() == 1
    (item,) = queue.take(10)
    assert (item.key, item.attempts) == ("words/w1", 0)
    (still_dead,) = queue.list(DEAD)
    assert still_dead.kind == "quarantined" and still_dead.source == b"{not json\xff"


def test_stats_by_state_kind_and_batch(queue):
    queue.put([doc_item(n, batch="b1") for n in range(3)] + [doc_item(3, batch="b1", due=False)])
    queue.put([doc_item(n, batch="b2") for n in range(10, 12)])
    queue.dead_letter([quarantined(5, batch="b2"), doc_item(20, batch="b2", kind="permanent")])
    queue.take(1, batch_id="b2")
    stats = queue.stats()
    assert {k: stats[k] for k in ("due", "later", "leased", "dead", "pending")} == \
        {"due": 4, "later": 1, "leased": 1, "dead": 2, "pending": 6}
    assert stats["by_kind"] == {"retryable": 6, "quarantined": 1, "permanent": 1}
    b1, b2 = stats["batches"]["b1"], stats["batches"]["b2"]
    assert (b1["due"], b1["later"], b1["leased"], b1["dead"]) == (3, 1, 0, 0)
    assert (b2["due"], b2["later"], b2["leased"], b2["dead"]) == (1, 0, 1, 2)
    assert 0 <= stats["oldest_age_s"] < 60


def test_list_filters_by_status_and_batch_oldest_first(queue):
    queue.put([doc_item(1, batch="b1")])
    time.sleep(0.01)
    queue.dead_letter([quarantined(2, batch="b2")])
    time.sleep(0.01)
    queue.put([doc_item(3, batch="b2")])
    assert [item.key for item in queue.list()] == ["words/w1", quarantined(2, "b2").key, "words/w3"]
    assert keys(queue.list(DEAD)) == {quarantined(2, "b2").key}
    assert keys(queue.list(PENDING, batch_id="b2")) == {"words/w3"}
    assert len(queue.list(limit=2)) == 2


def test_items_survive_reopening(open_test_queue):
    first = open_test_queue()
    first.put([doc_item(n) for n in range(5)])
    first.take(2)  # leased by a drainer that then disappears
    first.close()
    assert open_test_queue().stats()["pending"] == 5


@pytest.mark.fast
def test_unreachable_redis_names_the_url_without_password():
    from support import free_port
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(QueueError) as raised:
        open_queue(url)
    message = str(raised.value)
    assert f"redis://:***@127.0.0.1:{url.split(':')[3]}" in message and "hunter2" not in message
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.fast
def test_unknown_queue_url_is_a_configuration_error():
    from pushagent.errors import ConfigError
    with pytest.raises(ConfigError):
        open_queue("mysql://db/queue")


def test_make_due_moves_later_items_forward_and_leaves_leased_and_dead_alone(queue):
    queue.put([doc_item(n, due=False) for n in range(3)] + [doc_item(n, batch="b2", due=False) for n in (3, 4)])
    queue.dead_letter([doc_item(5)])
    (leased,) = queue.take(1, due_only=False, batch_id="b2")
    assert queue.make_due("b1") == 3
    assert keys(queue.take(10)) == {"words/w0", "words/w1", "words/w2"}
    assert queue.make_due() == 1          # the other b2 item; the leased one and the dead one stay
    (taken,) = queue.take(10)
    assert taken.key in {"words/w3", "words/w4"} and taken.key != leased.key and taken.next_attempt_at <= time.time()


class Acked:
    """What a push or drain hands to resolve(): index, id and acknowledged version."""

    def __init__(self, n: int, version: int, index: str = "words"):
        self.index, self.doc_id, self.version = index, f"w{n}", version


def test_resolve_removes_queued_and_dead_items_of_that_version_or_older_only(queue):
    queue.put([doc_item(0, version=100), doc_item(1, version=100), doc_item(2, version=300)])
    queue.dead_letter([doc_item(3, version=100, kind="permanent"), quarantined(7)])
    (leased,) = queue.take(1, batch_id="b1")
    removed = queue.resolve([Acked(0, 200), Acked(1, 100), Acked(2, 200), Acked(3, 150), Acked(9, 500),
                             Acked(0, 100, index="other")])
    assert removed == 3
    assert keys(queue.list(limit=100)) == {"words/w2", quarantined(7).key}
    assert queue.ack([leased]) == (0 if leased.key != "words/w2" else 1)
    assert queue.stats()["dead"] == 1


def test_resolve_looks_no_further_in_an_empty_queue_and_finds_every_kind_of_item_otherwise(queue, open_test_queue):
    """A push resolves every document it sends: an empty queue must answer at once, and a queue holding
    anything (pending, leased by another drainer, or dead) must still be searched."""
    assert queue._empty() and queue.resolve([Acked(0, 200)]) == 0
    queue.put([doc_item(0, version=100)])
    assert len(open_test_queue().take(1)) == 1       # leased by another drainer
    assert not queue._empty() and queue.resolve([Acked(0, 200)]) == 1 and queue._empty()
    queue.dead_letter([doc_item(1, version=100, kind="permanent")])
    assert not queue._empty() and queue.resolve([Acked(1, 100)]) == 1 and queue._empty()
    queue.put([doc_item(2, version=100)])
    assert queue.resolve([Acked(2, 100)]) == 1 and queue._empty()


def test_a_409_leaves_a_repair_of_that_version_queued(queue):
    repair = doc_item(5, version=100, kind="repair")
    repair.version_type = "external_gte"
    queue.put([repair, doc_item(6, version=100)])
    assert queue.resolve([Acked(5, 100), Acked(6, 100)], conflict=True) == 1    # the plain item only
    assert keys(queue.list(limit=10)) == {"words/w5"}
    assert queue.resolve([Acked(5, 150)], conflict=True) == 1                  # a newer version held: done
    queue.put([repair])
    assert queue.resolve([Acked(5, 100)]) == 1                                 # the repair itself acknowledged


def test_an_older_index_item_never_outlives_a_newer_acknowledged_delete(queue):
    queue.put([doc_item(4, version=100)])
    (taken,) = queue.take(1)
    assert queue.resolve([Acked(4, 200)]) == 1    # a delete of version 200 was acknowledged
    assert queue.fail([taken]) == 0                # the drainer holding the old item cannot bring it back
    assert queue.list() == [] and queue.take(10, due_only=False) == []


def test_purge_deletes_dead_items_by_batch_reason_and_age(queue):
    old = [doc_item(n, kind="permanent") for n in range(3)]
    for item in old:
        item.last_error = "400 mapper_parsing_exception: failed to parse field [vector]"
    queue.dead_letter(old + [quarantined(10)])
    time.sleep(0.3)
    queue.dead_letter([doc_item(5, batch="b2", kind="permanent"), quarantined(11, batch="b2")])
    queue.put([doc_item(6)])
    assert queue.purge(reason="mapper_parsing") == 3
    assert queue.purge(batch_id="b2", older_than=10) == 0
    assert queue.purge(older_than=0.2) == 1                # quarantined(10), the only old one left
    assert queue.purge(batch_id="b2") == 2
    assert keys(queue.list(limit=100)) == {"words/w6"} and queue.stats()["dead"] == 0
