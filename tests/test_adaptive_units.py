"""The sender's adaptive concurrency and `compress: auto`, on a fake clock: no sleeps, no network."""

import collections
import logging
import threading
import time

import pytest

from pushagent.cluster.bulk import ChunkSender
from pushagent.cluster.compression import CONFIRM, PROBES, REPROBE, Compression, Encoding
from pushagent.cluster.concurrency import ConcurrencyLimit, SendingOrder
from pushagent.cluster.transport import BulkResponse, TransferStats
from pushagent.config import Config, load_config
from pushagent.documents.builder import Doc
from pushagent.errors import ChunkAborted, ConfigError
from pushagent.ops.metrics import RunFacts, registry_for
from pushagent.ops.progress import Snapshot
from pushagent.state.ledger import Ledger

pytestmark = pytest.mark.fast


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def round_trip(limit: ConcurrencyLimit, clock: Clock, seconds_for, docs: int = 1000, rejected=False) -> list:
    """Fill every slot at once, let `seconds_for(in flight)` pass, answer them all; the limit after each answer."""
    slots = [limit.acquire() for _ in range(limit.limit)]
    clock.now += seconds_for(len(slots))
    seen = []
    for slot in slots:
        limit.release(slot)
        seen.append(limit.rejected(slot) if rejected else limit.answered(slot, seconds_for(len(slots)), docs))
    return seen


def steady(limit: ConcurrencyLimit, clock: Clock, seconds_for, answers: int) -> list:
    """Keep every slot busy, as the push's workers do: answer the oldest request, send new ones up to the
    limit, and so on; `seconds_for(in flight)` is a request's time. The limit after each answer."""
    flying, seen = collections.deque(), []     # (slot, its time)
    for _ in range(answers):
        while len(flying) < limit.limit:
            flying.append((limit.acquire(), seconds_for(len(flying) + 1)))
        slot, seconds = flying.popleft()
        clock.now = max(clock.now, slot.sent_at + seconds)
        limit.release(slot)
        seen.append(limit.answered(slot, seconds, 1000))
    return seen


def test_with_room_the_limit_doubles_each_round_trip_up_to_the_ceiling():
    clock = Clock()
    limit = ConcurrencyLimit(2, 16, clock)
    seen = steady(limit, clock, lambda in_flight: 1.0, 16)     # a link with room: more requests, same time each
    assert seen[:14] == list(range(3, 17)) and clock.now == 100 + 4 * 1.0, seen   # 2, 4, 8, 16 a round trip


def test_a_bottleneck_holds_the_limit_where_two_to_four_requests_queue():
    clock = Clock()
    limit = ConcurrencyLimit(1, 16, clock)
    # A link that serves one request in 1 s, behind 2 s of round trip and indexing: 3 in flight fill it,
    # a fourth and more only queue (the time each takes grows with every request over 3).
    bottleneck = lambda in_flight: max(3.0, in_flight * 1.0)   # noqa: E731
    seen = steady(limit, clock, bottleneck, 80)
    assert max(seen) <= 9 and set(seen[-20:]) <= {5, 6, 7}, seen     # 3 that fill it, 2 to 4 waiting


def test_after_the_first_cut_one_raise_per_round_trip():
    clock = Clock()
    limit = ConcurrencyLimit(8, 8, clock)
    round_trip(limit, clock, lambda in_flight: 1.0)
    round_trip(limit, clock, lambda in_flight: 3.0)    # three times slower at the same load: requests queue
    assert limit.limit == 7                             # one cut for the whole burst of slow answers
    assert round_trip(limit, clock, lambda in_flight: 1.0, rejected=True) == [3] * 7
    started = clock.now
    seen = steady(limit, clock, lambda in_flight: 1.0, 30)       # room again: it climbs back, slowly
    round_trips = clock.now - started
    assert seen[-1] >= 7 and seen[-1] - 3 <= round_trips + 1, (seen, round_trips)


def test_rising_latency_takes_slots_back():
    clock = Clock()
    limit = ConcurrencyLimit(8, 8, clock)
    round_trip(limit, clock, lambda in_flight: 1.0)
    for _ in range(10):
        round_trip(limit, clock, lambda in_flight: in_flight * 1.0)   # every request more only waits longer
    assert limit.limit <= 5     # all but one of them wait: no more than 4


def test_a_rejection_halves_the_limit_once_per_burst_down_to_one():
    clock = Clock()
    limit = ConcurrencyLimit(8, 8, clock)
    assert round_trip(limit, clock, lambda in_flight: 1.0, rejected=True) == [4] * 8
    assert round_trip(limit, clock, lambda in_flight: 1.0, rejected=True) == [2] * 4
    for _ in range(3):
        round_trip(limit, clock, lambda in_flight: 1.0, rejected=True)
    assert limit.limit == 1


def test_a_rejection_after_a_raise_still_cuts():
    clock = Clock()
    limit = ConcurrencyLimit(4, 8, clock)
    early = [limit.acquire() for _ in range(4)]
    clock.now += 1
    limit.release(early[3])
    assert limit.answered(early[3], 1.0, 1000) == 5    # the request that filled the limit: a raise
    limit.release(early[0])
    assert limit.rejected(early[0]) == 2               # sent before the raise, answered with a 429: it counts


def test_remnants_and_half_empty_rounds_do_not_raise():
    clock = Clock()
    limit = ConcurrencyLimit(2, 8, clock)
    round_trip(limit, clock, lambda in_flight: 1.0, docs=1000)
    assert limit.limit == 4
    round_trip(limit, clock, lambda in_flight: 0.1, docs=10)     # a retried remnant: says nothing of load
    assert limit.limit == 4
    slot = limit.acquire()                                        # one of four slots taken: no limit held it
    clock.now += 1
    limit.release(slot)
    assert limit.answered(slot, 1.0, 1000) == 4


def test_work_kept_back_by_the_limit_elsewhere_counts_as_a_held_limit():
    clock = Clock()
    limit = ConcurrencyLimit(4, 8, clock)
    round_trip(limit, clock, lambda in_flight: 1.0, rejected=True)     # limit 2, no longer starting
    slot = limit.acquire()               # one slot of two taken: a slow chunk holds the others uncommitted
    limit.held()                         # the next chunk waits for room all the same
    clock.now += 1
    limit.release(slot)
    assert limit.answered(slot, 1.0, 1000) == 3


def test_a_request_owns_its_share_of_each_second_it_was_out_with_others():
    clock = Clock()
    limit = ConcurrencyLimit(2, 2, clock)
    first = limit.acquire()
    clock.now += 1                      # alone
    second = limit.acquire()
    clock.now += 2                      # the two out together
    assert limit.release(first) == pytest.approx(2.0)
    clock.now += 1                      # the second alone
    assert limit.release(second) == pytest.approx(2.0)


def test_a_stopping_run_does_not_wait_for_a_slot():
    limit = ConcurrencyLimit(1, 1, Clock())
    slot = limit.acquire()
    assert slot is not None
    stop = threading.Event()
    stop.set()
    assert limit.acquire(stop) is None
    limit.release(slot)
    assert limit.acquire(stop) is not None


def test_first_requests_take_their_turn_and_a_chunk_done_early_is_skipped_when_its_turn_comes():
    order, stop = SendingOrder(), threading.Event()
    first, second, third = order.ticket(), order.ticket(), order.ticket()
    assert order.wait(first, stop)
    order.passed(second)        # nothing to send: done before its turn
    waiting = threading.Thread(target=order.wait, args=(third, stop))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()   # the first has not taken its slot yet
    order.passed(first)
    waiting.join(2)
    assert not waiting.is_alive()
    order.passed(first)         # again (the worker's own pass after the sender's): no harm
    fourth = order.ticket()
    stop.set()
    assert order.wait(fourth, stop) is False


def probe_round(compression: Compression, seconds: dict, docs: int = 1000) -> list:
    """Send and answer PROBES requests; `seconds` maps gzip -> time a request takes. The encodings sent."""
    sent = [compression.pick() for _ in range(PROBES)]
    for encoding in sent:
        compression.answered(encoding, seconds[encoding.gzip], docs)
    return sent


def test_auto_alternates_its_probes_and_keeps_the_faster_encoding():
    compression = Compression("auto")
    sent = probe_round(compression, {True: 1.0, False: 2.2})      # a slow link: gzip'd bodies cross faster
    assert [e.gzip for e in sent] == [True, False, True, False] and all(e.probe for e in sent)
    assert compression.gzip is True
    assert {compression.pick() for _ in range(REPROBE - PROBES)} == {Encoding(True, False)}
    probe_round(compression, {True: 1.3, False: 1.1})             # now the cluster's CPU limits: plain wins
    assert compression.gzip is False and compression.pick() == Encoding(False, False)
    for _ in range(CONFIRM - 1):               # a switch is measured again sooner than REPROBE requests later
        compression.pick()
    sent = probe_round(compression, {True: 1.0, False: 1.2})      # gzip a little faster: plain stays
    assert all(e.probe for e in sent) and compression.gzip is False
    for gzip, seconds in ((False, 1.3), (True, 1.0), (False, 1.3), (True, 1.0)):   # plain clearly slower
        compression.answered(Encoding(gzip, True), seconds, 1000)
    assert compression.gzip is True


def test_auto_keeps_the_encoding_in_use_when_plain_probes_are_neither_clearly_slower_nor_faster(caplog):
    """In the middle of a push over a WAN, with the node the bound, plain probes took 1.11-1.17x as long per
    document as gzip'd ones: plain was taken, and its bodies filled the link until the next measurement."""
    compression = Compression("auto")
    probe_round(compression, {True: 1.0, False: 2.2})
    assert compression.gzip is True
    for _ in range(REPROBE - PROBES):
        compression.pick()
    with caplog.at_level(logging.DEBUG, logger="pushagent.cluster.compression"):
        probe_round(compression, {True: 1.0, False: 1.17})
    assert compression.gzip is True
    assert caplog.records[-1].levelno == logging.DEBUG and "1.17x" in caplog.records[-1].getMessage()
    for _ in range(REPROBE - PROBES):
        compression.pick()
    with caplog.at_level(logging.INFO, logger="pushagent.cluster.compression"):
        probe_round(compression, {True: 1.0, False: 0.8})              # plain faster: the cluster's CPU limits
    assert compression.gzip is False
    assert caplog.records[-1].levelno == logging.INFO and "switching to plain" in caplog.records[-1].getMessage()
    for _ in range(CONFIRM):
        compression.pick()
    probe_round(compression, {True: 1.0, False: 1.17})
    assert compression.gzip is False                                  # and the same in-between keeps plain


def test_the_first_measurement_decides_alone_as_the_first_requests_cross_the_link_together():
    """On loopback, a node still warming up: plain probes took 1.03x as long. No measurement has chosen gzip,
    and a plain probe among the first requests paid for its bytes on the link: plain."""
    compression = Compression("auto")
    probe_round(compression, {True: 1.0, False: 1.03})
    assert compression.gzip is False


def test_a_switch_is_measured_again_soon_and_undone_when_the_link_shows_it_was_wrong():
    """Over a WAN in the middle of a push, the node the bound: a plain probe once looked faster (0.79x);
    with plain, the link became the bound, and the next measurement said so (1.87x)."""
    compression = Compression("auto")
    probe_round(compression, {True: 1.0, False: 2.0})
    assert [compression.pick().probe for _ in range(REPROBE - PROBES)] == [False] * (REPROBE - PROBES)
    probe_round(compression, {True: 1.0, False: 0.79})
    assert compression.gzip is False
    assert [compression.pick() for _ in range(CONFIRM)] == [Encoding(False, False)] * CONFIRM
    sent = probe_round(compression, {True: 1.0, False: 1.87})
    assert all(encoding.probe for encoding in sent) and compression.gzip is True
    assert not compression.probe_due()
    assert [compression.pick() for _ in range(CONFIRM)] == [Encoding(True, False)] * CONFIRM
    probe_round(compression, {True: 1.0, False: 1.9})                # the switch back holds
    assert compression.gzip is True
    assert [compression.pick().probe for _ in range(REPROBE - PROBES)] == [False] * (REPROBE - PROBES)
    assert compression.probe_due()


def test_auto_goes_by_each_encodings_fastest_probe_as_what_gets_in_the_way_only_adds_time():
    """Own seconds per request of a push over a WAN whose node was cold for the first pair: gzip'd 2.34 and
    1.05, plain 2.21 and 2.01 (means 1.25x apart, so plain; the link fits 2.4x more gzip'd bodies)."""
    compression = Compression("auto")
    sent = [compression.pick() for _ in range(PROBES)]
    for encoding, seconds in zip(sent, (2.34, 2.21, 1.05, 2.01)):
        compression.answered(encoding, seconds, 1000)
    assert compression.gzip is True


def test_auto_decides_only_on_full_size_answers_of_both_encodings():
    compression = Compression("auto")
    first = [compression.pick() for _ in range(PROBES)]
    compression.answered(first[0], 5.0, 1000)
    compression.answered(first[1], 0.1, 10)        # a remnant: no probe
    compression.answered(first[2], 5.0, 1000)
    assert compression.gzip is True                  # one encoding measured only: nothing decided
    compression.answered(first[3], 1.0, 1000)
    assert compression.gzip is True                  # one plain answer is not enough either
    compression.answered(Encoding(False, True), 1.0, 1000)
    assert compression.gzip is False


def test_fixed_settings_never_probe():
    for setting in (True, False):
        compression = Compression(setting)
        assert {compression.pick() for _ in range(2 * REPROBE)} == {Encoding(setting, False)}


def test_compress_and_max_concurrency_are_config_keys_and_older_configs_keep_their_concurrency(tmp_path):
    config = load_config(environ={})
    assert (config.compress, config.concurrency, config.max_concurrency, config.concurrency_ceiling) == \
        ("auto", 2, 8, 8)
    assert [load_config(environ={"PUSHAGENT_COMPRESS": value}).compress for value in ("AUTO", "false", "yes")] == \
        ["auto", False, True]
    with pytest.raises(ConfigError, match="bad value for compress: 'sometimes' \\(expected true, false or auto\\)"):
        load_config(environ={"PUSHAGENT_COMPRESS": "sometimes"})
    older = tmp_path / "pushagent.yaml"
    older.write_text("concurrency: 12\ncompress: true\n")
    assert load_config(str(older), environ={}).concurrency_ceiling == 12    # it asked for 12: it may have them
    with pytest.raises(ConfigError, match="max_concurrency"):
        load_config(environ={"PUSHAGENT_MAX_CONCURRENCY": "0"})


class TimedTransport:
    """A cluster whose answers take `seconds(gzip)` on the fake clock; records the encodings it got."""

    def __init__(self, clock: Clock, seconds):
        self.clock, self.seconds, self.encodings = clock, seconds, []

    def post(self, payload, docs=0, gzip=False, raw_bytes=None):
        self.encodings.append(gzip)
        self.clock.now += self.seconds(gzip)
        return BulkResponse(200, [{"index": {"status": 201}}] * docs)


class Unlimited:
    rate_per_minute = 100.0

    def acquire(self, stop_event=None):
        return True

    def slow_down(self):
        return self.rate_per_minute

    speed_up = slow_down


def docs(count=100):
    return [Doc("words", f"w{n}", 1, "index", b'{"index":{}}', b"{}", "", "f", n + 1) for n in range(count)]


def test_the_sender_measures_each_request_and_reports_what_it_settled_on():
    clock = Clock()
    transport = TimedTransport(clock, lambda gzip: 1.0 if gzip else 2.0)   # plain bodies take twice as long
    stats = TransferStats()
    sender = ChunkSender(transport, Config(concurrency=1, max_concurrency=4), stats, Unlimited(),
                         threading.Event(), clock=clock)
    for _ in range(8):
        sender.resolve(docs())
    assert transport.encodings[:PROBES] == [True, False, True, False] and transport.encodings[PROBES:] == [True] * 4
    # One request at a time filled a limit of one, and never a limit of two: two it stays.
    assert (stats.compress, stats.concurrency, stats.concurrency_peak) == (True, 2, 2)


def test_nothing_leaves_once_the_run_stops_though_a_token_and_a_slot_are_free():
    transport, stop = TimedTransport(Clock(), lambda gzip: 1.0), threading.Event()
    sender = ChunkSender(transport, Config(concurrency=2), TransferStats(), Unlimited(), stop)
    stop.set()
    with pytest.raises(ChunkAborted):
        sender.resolve(docs())
    assert transport.encodings == []


def test_auto_judges_each_probe_by_its_own_share_not_by_how_much_else_was_out():
    """As the limit rises in a push's first requests, a plain probe may go out with more requests beside it
    than a gzip'd one and take longer for that alone (loopback, where plain is the faster)."""
    clock = Clock()
    sender = ChunkSender(None, Config(concurrency=4, max_concurrency=4), TransferStats(), Unlimited(),
                         threading.Event(), clock=clock)

    class CrowdedPlain(TimedTransport):
        def post(self, payload, docs=0, gzip=False, raw_bytes=None):
            others = [] if gzip else [sender.in_flight.acquire() for _ in range(3)]
            answer = super().post(payload, docs, gzip, raw_bytes)
            for slot in others:
                sender.in_flight.release(slot)
            return answer
    sender.transport = CrowdedPlain(clock, lambda gzip: 1.0 if gzip else 2.0)    # plain: half of 4 x 1 s alone
    for _ in range(PROBES):
        sender.resolve(docs())
    assert sender.transport.encodings == [True, False, True, False] and sender.compression.gzip is False


def test_the_concurrency_in_use_shows_in_progress_and_metrics():
    line = Snapshot("b", 10, 10, 1, 2, 1, 1.0, rate_per_minute=100.0, concurrency=5, requests_out=3).line()
    assert line.endswith("| rate 100 req/min | 3 of 5 in flight")
    facts = RunFacts("b", "pushing", Ledger(read=1), {}, 0, 0, 0, [], {}, 1.0, time.time(), 100.0, 5, False, 3)
    values = {sample.name: sample.value for family in registry_for(facts).collect() for sample in family.samples}
    assert (values["pushagent_concurrency"], values["pushagent_requests_in_flight"],
            values["pushagent_compress"]) == (5, 3, 0)


def test_the_requests_out_are_the_slots_taken_not_the_limit_that_allows_them():
    """One request at a time under a limit of 4 (the reading or the memory budget held the others back):
    one out, not four, while it is out; none once it is answered."""
    stats = TransferStats()
    seen_while_out = []

    class Watching(TimedTransport):
        def post(self, payload, docs=0, gzip=False, raw_bytes=None):
            seen_while_out.append(stats.requests_out)
            return super().post(payload, docs, gzip, raw_bytes)

    clock = Clock()
    sender = ChunkSender(Watching(clock, lambda gzip: 1.0), Config(concurrency=4, max_concurrency=4,
                         compress=False), stats, Unlimited(), threading.Event(), clock=clock)
    for _ in range(3):
        sender.resolve(docs())
    assert seen_while_out == [1, 1, 1] and stats.concurrency == 4
    assert (stats.requests_out, stats.requests_out_peak) == (0, 1)
