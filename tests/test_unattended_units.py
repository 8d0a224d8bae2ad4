"""Outage budget, Retry-After, backpressure and first-error warnings of the sender, on a fake transport and clock.

A fake clock lets a 600 s Retry-After and a 15-minute outage run in milliseconds
through the same code paths as a real push.
"""

import logging

import pytest

from pushagent.cluster.bulk import ChunkSender
from pushagent.cluster.ratelimit import TokenBucket, bucket_for, task_rate
from pushagent.cluster.transport import BulkResponse, TransferStats, TransportFailure
from pushagent.config import Config, load_config
from pushagent.documents.builder import Doc
from pushagent.errors import ChunkAborted, ConfigError

pytestmark = pytest.mark.fast


class FakeTime:
    """A monotonic clock and a stop event whose wait() moves the clock instead of sleeping."""

    def __init__(self):
        self.now = 1000.0
        self.waits = []

    def __call__(self):
        return self.now

    def wait(self, seconds):
        self.waits.append(seconds)
        self.now += seconds
        return False

    def is_set(self):
        return False


class FakeLimiter:
    def __init__(self, rate=100.0):
        self.rate_per_minute = rate
        self.calls = []

    def acquire(self, stop_event=None):
        return True

    def slow_down(self):
        self.calls.append("down")
        return self.rate_per_minute

    def speed_up(self):
        self.calls.append("up")
        return self.rate_per_minute


class ScriptedTransport:
    """Answers from a list of functions of the request's document count; the last one repeats."""

    def __init__(self, fake_time, *answers):
        self.time = fake_time
        self.answers = list(answers)
        self.sent_at = []

    def post(self, payload, docs=0, gzip=False, raw_bytes=None):
        self.sent_at.append(self.time.now)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(docs)


def ok(docs):
    return BulkResponse(200, [{"index": {"status": 201}}] * docs)


def refused(status=429, error_type="cluster_block_exception", every=1):
    def answer(docs):
        item = {"index": {"status": status, "error": {"type": error_type, "reason": "index [words] blocked"}}}
        return BulkResponse(200, [item if n % every == 0 else {"index": {"status": 201}} for n in range(docs)])
    return answer


def whole(status, retry_after=None, text='{"error":{"type":"unavailable","reason":"node restarting"}}'):
    return lambda docs: BulkResponse(status, None, retry_after, text)


def connection_refused(docs):
    raise TransportFailure("ConnectionError: connection refused")


def docs(count=10):
    return [Doc("words", f"w{n}", 1, "index", b'{"index":{}}', b"{}", "", "f", n + 1) for n in range(count)]


def sender(fake_time, transport, limiter=None, **settings):
    config = Config(**{"retry_backoff_seconds": 1.0, "max_backoff_seconds": 60, **settings})
    return ChunkSender(transport, config, TransferStats(), limiter or FakeLimiter(), fake_time, clock=fake_time)


def test_a_retry_after_of_600_s_is_waited_for_in_full():
    clock = FakeTime()
    transport = ScriptedTransport(clock, whole(429, retry_after=600.0), ok)
    outcome = sender(clock, transport).resolve(docs())
    assert len(outcome.indexed) == 10 and not outcome.retry
    assert transport.sent_at[1] - transport.sent_at[0] >= 600   # not cut to max_backoff_seconds (60)


def test_retry_after_is_cut_to_what_is_left_of_the_budget_then_the_run_stops():
    clock = FakeTime()
    transport = ScriptedTransport(clock, whole(429, retry_after=600.0))
    chunk_sender = sender(clock, transport, outage_seconds=100)
    with pytest.raises(ChunkAborted):
        chunk_sender.resolve(docs())
    assert len(transport.sent_at) == 2 and transport.sent_at[1] - transport.sent_at[0] == pytest.approx(100)
    assert chunk_sender.outage.tripped.is_set()
    message = str(chunk_sender.outage.error())
    assert "nothing useful for 100 s (outage_seconds is 100)" in message and "HTTP 429" in message


def test_a_15_minute_outage_is_ridden_out_with_capped_backoff():
    clock = FakeTime()
    started = clock.now
    until_880_s = lambda d: connection_refused(d) if clock.now < started + 880 else ok(d)   # noqa: E731
    transport = ScriptedTransport(clock, connection_refused, whole(503), until_880_s)
    outcome = sender(clock, transport, outage_seconds=900, max_retries=3).resolve(docs())
    assert len(outcome.indexed) == 10
    gaps = [b - a for a, b in zip(transport.sent_at, transport.sent_at[1:])]
    assert len(transport.sent_at) > 15 and max(gaps) <= 60   # many attempts, none more than the cap apart


def test_past_the_budget_the_run_stops_with_the_last_reason():
    clock = FakeTime()
    transport = ScriptedTransport(clock, whole(503))
    chunk_sender = sender(clock, transport, outage_seconds=300)
    with pytest.raises(ChunkAborted):
        chunk_sender.resolve(docs())
    assert 300 <= clock.now - 1000 <= 300.001 and "HTTP 503" in str(chunk_sender.outage.error())


def test_items_all_refused_are_a_pause_not_max_retries():
    clock = FakeTime()
    transport = ScriptedTransport(clock, *[refused()] * 12, ok)   # 12 answers, every item 429
    outcome = sender(clock, transport, max_retries=3).resolve(docs())
    assert len(outcome.indexed) == 10 and not outcome.retry


def test_items_refused_among_accepted_ones_keep_max_retries():
    clock = FakeTime()
    transport = ScriptedTransport(clock, refused(every=2))
    outcome = sender(clock, transport, max_retries=1).resolve(docs(8))
    # 8 -> 4 refused -> 2 refused: the second round is the last (max_retries 1), the rest is queued.
    assert (len(outcome.indexed), len(outcome.retry)) == (6, 2)


def test_a_chunk_refused_alone_for_the_whole_budget_is_queued_while_others_pass():
    clock = FakeTime()
    transport = ScriptedTransport(clock, refused())
    chunk_sender = sender(clock, transport, outage_seconds=120)
    original_left = chunk_sender.outage.left

    def left_with_others_passing(streak, reason):
        chunk_sender.outage.useful()   # another worker's chunk just went through
        return original_left(streak, reason)
    chunk_sender.outage.left = left_with_others_passing
    outcome = chunk_sender.resolve(docs(4))
    assert len(outcome.retry) == 4 and not chunk_sender.outage.tripped.is_set()


def test_rejections_slow_the_bucket_and_clean_answers_raise_it_again():
    clock = [0.0]
    bucket = TokenBucket(120, burst=2, clock=lambda: clock[0])
    assert bucket.slow_down() == 60
    assert bucket.slow_down() == 60          # the same burst of rejections counts once
    for second in range(1, 10):
        clock[0] = second
        bucket.slow_down()
    assert bucket.rate_per_minute == 120 / 16   # the floor
    rates = [bucket.speed_up() for _ in range(16)]
    assert rates[0] == 7.5 + 15 and rates[-1] == 120


def test_the_sender_reports_the_rate_it_settled_at():
    clock = FakeTime()
    bucket = TokenBucket(100, burst=2, clock=clock)
    stats = TransferStats()
    config = Config(retry_backoff_seconds=1.0)
    transport = ScriptedTransport(clock, refused(), refused(), ok)
    ChunkSender(transport, config, stats, bucket, clock, clock=clock).resolve(docs())
    assert stats.rate_per_minute == bucket.rate_per_minute < 100


def test_array_tasks_split_the_keys_budget():
    assert task_rate(100, {"SLURM_ARRAY_TASK_COUNT": "8"}) == 12.5
    assert task_rate(100, {"SLURM_ARRAY_TASK_COUNT": "1"}) == 100
    assert task_rate(100, {}) == 100
    config = Config(requests_per_minute=90, concurrency=3)
    bucket = bucket_for(config, {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "2"})
    assert (bucket.rate_per_minute, bucket.ceiling, bucket.burst) == (30, 30, 3)


def test_each_kind_of_error_is_warned_about_once(caplog):
    clock = FakeTime()
    transport = ScriptedTransport(clock, whole(503), whole(503), refused(), refused(), ok)
    with caplog.at_level(logging.WARNING, logger="pushagent.errors"):
        sender(clock, transport).resolve(docs())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0] == "bulk request failed: 503 unavailable: node restarting (first time in this run; 1 so far)"
    assert lines[1] == ("bulk items refused: 429 cluster_block_exception: index [words] blocked "
                        "(first time in this run; 10 so far)")


def test_outage_seconds_is_a_config_key_with_a_duration(tmp_path):
    assert Config().outage_seconds == 900
    assert load_config(environ={"PUSHAGENT_OUTAGE_SECONDS": "2m"}).outage_seconds == 120
    with pytest.raises(ConfigError):
        load_config(environ={"PUSHAGENT_OUTAGE_SECONDS": "-1"})
    old = tmp_path / "pushagent.yaml"
    old.write_text("max_consecutive_failures: 10\n")
    with pytest.raises(ConfigError, match="max_consecutive_failures is no longer used") as raised:
        load_config(str(old), environ={})
    assert "outage_seconds" in str(raised.value)


def test_rejections_halve_the_requests_in_flight_and_clean_answers_add_one():
    clock = FakeTime()
    transport = ScriptedTransport(clock, refused(), refused(), ok)
    chunk_sender = sender(clock, transport, concurrency=4)
    chunk_sender.in_flight.limit = 4
    chunk_sender.resolve(docs())
    assert chunk_sender.in_flight.limit == 2     # 4 -> 2 -> 1 on two refusals, +1 on the clean answer
