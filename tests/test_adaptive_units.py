"""The sender's adaptive concurrency and `compress: auto`, on a fake clock: no sleeps, no network."""

import threading

from pushagent.cluster.compression import PROBES, REPROBE, Compression, Encoding
from pushagent.cluster.concurrency import ConcurrencyLimit


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def round_trip(limit: ConcurrencyLimit, clock: Clock, seconds_for, docs: int = 1000, rejected=False) -> list:
    """Fill every slot, let `seconds_for(in flight)` pass, answer them all; the limits seen after each answer."""
    slots = [limit.acquire() for _ in range(limit.limit)]
    clock.now += seconds_for(len(slots))
    seen = []
    for slot in slots:
        limit.release()
        seen.append(limit.rejected(slot) if rejected else limit.answered(slot, seconds_for(len(slots)), docs))
    return seen


def test_flat_latency_raises_the_limit_by_one_a_round_trip_up_to_the_ceiling():
    clock = Clock()
    limit = ConcurrencyLimit(2, 8, clock)
    flat = lambda in_flight: 1.0   # noqa: E731 - a link with room: more requests, same time each
    assert round_trip(limit, clock, flat) == [2, 3]     # the first answer's slot was not full: no raise
    assert round_trip(limit, clock, flat) == [3, 3, 4]  # one raise per round trip, not per answer
    for _ in range(10):
        round_trip(limit, clock, flat)
    assert limit.limit == 8


def test_a_bottleneck_holds_the_limit_where_one_or_two_requests_queue():
    clock = Clock()
    limit = ConcurrencyLimit(1, 16, clock)
    # A link that serves one request in 1 s, behind 2 s of round trip and indexing: 3 in flight fill it,
    # a fourth and more only queue (the time each takes grows with every request over 3).
    bottleneck = lambda in_flight: max(3.0, in_flight * 1.0)   # noqa: E731
    history = [limit.limit] + [round_trip(limit, clock, bottleneck)[-1] for _ in range(30)]
    assert max(history) <= 6 and set(history[-10:]) <= {4, 5}, history


def test_rising_latency_takes_slots_back():
    clock = Clock()
    limit = ConcurrencyLimit(8, 8, clock)
    round_trip(limit, clock, lambda in_flight: 1.0)
    round_trip(limit, clock, lambda in_flight: 3.0)    # three times slower at the same load: requests queue
    assert limit.limit == 7                             # one cut for the whole burst of slow answers
    for _ in range(10):
        round_trip(limit, clock, lambda in_flight: in_flight * 1.0)
    assert limit.limit <= 3


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
    limit.release()
    assert limit.answered(early[3], 1.0, 1000) == 5    # the slot that filled the limit: a raise
    limit.release()
    assert limit.rejected(early[0]) == 2   # sent before the raise, answered with a 429: it counts


def test_remnants_and_half_empty_rounds_do_not_raise():
    clock = Clock()
    limit = ConcurrencyLimit(2, 8, clock)
    round_trip(limit, clock, lambda in_flight: 1.0, docs=1000)
    assert limit.limit == 3
    round_trip(limit, clock, lambda in_flight: 0.1, docs=10)     # a retried remnant: says nothing of load
    assert limit.limit == 3
    slot = limit.acquire()                                        # one of three slots taken: no limit held it
    clock.now += 1
    limit.release()
    assert limit.answered(slot, 1.0, 1000) == 3


def test_a_stopping_run_does_not_wait_for_a_slot():
    limit = ConcurrencyLimit(1, 1, Clock())
    assert limit.acquire() is not None
    stop = threading.Event()
    stop.set()
    assert limit.acquire(stop) is None
    limit.release()
    assert limit.acquire(stop) is not None


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
