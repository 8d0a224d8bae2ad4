"""How many bulk requests are in flight: the agent finds it by itself, between 1 and `max_concurrency`.

The limit starts at `concurrency`. Every clean answer tells how long a
request took per document; the lowest of the last BASELINE_SECONDS is what
a request costs when nothing queues before it, on the link or in the
cluster. As TCP Vegas does, the two give how many requests wait in a queue
somewhere: `limit x (1 - lowest / now)`. Fewer than QUEUE_LOW, and the
limit held the sending back at some moment while the request was out (every
slot taken, or a ready chunk kept waiting: `held`), not the pace at which
chunks are built: one more slot, the bottleneck has room. More than
QUEUE_HIGH: one fewer, more requests would only wait longer and hold
memory. A 429 or a rejected execution halves the limit. The thresholds are
Linux's tcp_vegas defaults (2 and 4): a request moving over the link while
others are indexed is a pipeline kept full, and a bar of 1 and 2 held a WAN
push at 3-4 in flight with its link a third idle (benchmarks/).

As in TCP, the first raises come fast (one per answer: the limit doubles
every round trip) until the first sign of a queue or the first cut; from
then on a raise waits for the answer to a request sent after the raise
before it, one per round trip. A cut waits for the answer to a request sent
after the cut before it, so that a burst of answers to the same load counts
once.
"""

import collections
import dataclasses
import threading
import time

QUEUE_LOW = 2.0         # requests waiting below which one more slot pays (Linux's tcp_vegas: alpha 2)
QUEUE_HIGH = 4.0        # requests waiting above which a slot is taken back (beta 4)
BASELINE_SECONDS = 300  # the lowest latency is taken over this long: it follows a link or cluster that changes
SMOOTHING = 0.5         # weight of the newest answer in the latency now: one slow answer alone moves little
REMNANT = 4             # a request this many times smaller than the largest (a retried remnant) says nothing


@dataclasses.dataclass(frozen=True)
class Slot:
    """A request's place in flight: when it left, how many times every slot had been taken before (a later
    count tells that the limit held while it was out), and the limit's shared time then (_share)."""

    sent_at: float
    fills: int
    shared_at: float


class LatencyTrack:
    """Seconds per document of the recent answers to one kind of request (gzip'd or plain)."""

    def __init__(self):
        self._recent = collections.deque()      # (answered at, seconds per document)
        self._now = None
        self._largest = 0

    def queued(self, now: float, seconds: float, docs: int, limit: int) -> float | None:
        """How many requests waited somewhere while this one was served; None when it cannot tell."""
        if docs <= 0 or docs * REMNANT < self._largest:
            return None
        self._largest = max(self._largest, docs)
        per_doc = seconds / docs
        self._recent.append((now, per_doc))
        while self._recent[0][0] < now - BASELINE_SECONDS:
            self._recent.popleft()
        self._now = per_doc if self._now is None else SMOOTHING * per_doc + (1 - SMOOTHING) * self._now
        if self._now <= 0:      # answered within the clock's resolution: nothing can have waited
            return 0.0
        return limit * (1 - min(latency for _, latency in self._recent) / self._now)


class ConcurrencyLimit:
    """Slots for requests in flight; the limit moves with the answers (see the module's docstring).

    The workers are `ceiling` threads; one over the limit waits for a slot
    before sending, so a struggling cluster sees fewer parallel bulks.
    """

    def __init__(self, start: int, ceiling: int, clock=time.monotonic):
        self.ceiling = max(1, ceiling)
        self.limit = min(max(1, start), self.ceiling)
        self._clock = clock
        self.taken = self.taken_peak = 0    # slots taken now (requests out), and the most at once
        self._fills = 0             # how many times a request took the last free slot
        self._cut_at = self._raised_at = float("-inf")
        self._starting = True       # no queue seen yet: one raise per answer
        self._tracks = collections.defaultdict(LatencyTrack)
        self._shared, self._shared_since = 0.0, clock()    # see _share
        self._changed = threading.Condition()

    def acquire(self, stop_event: threading.Event | None = None) -> Slot | None:
        """Wait for a slot; None if `stop_event` was set while waiting."""
        with self._changed:
            while self.taken >= self.limit:
                if stop_event is not None and stop_event.is_set():
                    return None
                self._changed.wait(0.5)
            slot = Slot(self._clock(), self._fills, self._share())
            self.taken += 1
            self.taken_peak = max(self.taken_peak, self.taken)
            self._fills += self.taken >= self.limit
            return slot

    def release(self, slot: Slot) -> float:
        """The request of `slot` was answered (or failed); returns its own seconds (see _share)."""
        with self._changed:
            own = self._share() - slot.shared_at
            self.taken -= 1
            self._changed.notify_all()
            return own

    def _share(self) -> float:
        """The shared time up to now; called before `taken` changes.

        A request's own seconds are the shared time over its life: while n
        requests are out, each is given 1/n of every second, as requests that
        share one bottleneck (the cluster's cores, the link) each get, and
        the sum is about what it would have taken alone. Its plain time
        depends on what else was out meanwhile: in the first requests of a
        push, as the limit rises, the later ones wait behind more.
        """
        now = self._clock()
        if self.taken:
            self._shared += (now - self._shared_since) / self.taken
        self._shared_since = now
        return self._shared

    def held(self) -> None:
        """Work waited for room under the limit outside the slots (a push's chunks resolved behind a slow one
        and not committed yet count against it too): the limit held, as if every slot had been taken."""
        with self._changed:
            self._fills += 1

    def rejected(self, slot: Slot) -> int:
        """The cluster pushed back (429, rejected execution): halve the limit. Returns the limit."""
        with self._changed:
            if slot.sent_at >= self._cut_at:
                self._cut(self.limit // 2)
            return self.limit

    def answered(self, slot: Slot, seconds: float, docs: int, kind=None) -> int:
        """A clean answer to `docs` documents after `seconds`; `kind` keeps apart requests whose cost per
        document differs by design (gzip'd or plain). Returns the limit."""
        with self._changed:
            queued = self._tracks[kind].queued(self._clock(), seconds, docs, self.limit)
            if queued is None or slot.sent_at < self._cut_at:
                return self.limit
            self._starting = self._starting and queued < QUEUE_LOW
            if queued > QUEUE_HIGH:
                self._cut(self.limit - 1)
            elif queued < QUEUE_LOW and self._may_raise(slot):
                self.limit, self._raised_at = self.limit + 1, self._clock()
                self._changed.notify_all()
            return self.limit

    def _may_raise(self, slot: Slot) -> bool:
        """The limit held while `slot` was out, and it is the first answer since the last raise to a request
        sent after it (any answer while starting)."""
        held = self._fills > slot.fills
        return held and self.limit < self.ceiling and (self._starting or slot.sent_at >= self._raised_at)

    def _cut(self, limit: int) -> None:
        self.limit, self._cut_at, self._starting = max(1, limit), self._clock(), False


class SendingOrder:
    """The first requests of chunks take their rate token and slot in the order the chunks were handed out.

    Workers pick chunks up in order but reach the rate limit and the slots in
    any order. Were a later chunk to leave first, a stop could hold back an
    earlier one still waiting: the checkpoint cannot pass the earlier one, so
    the next run would send the later one again. In order, everything out at
    a stop comes before everything the stop held back. Retries are not
    ordered: their chunk left once already.
    """

    def __init__(self):
        self._changed = threading.Condition()
        self._issued = self._next = 0
        self._passed = set()    # tickets done ahead of their turn: skipped when it comes

    def ticket(self) -> int:
        """The next chunk's place in the order; take one per chunk, in the order they are handed out."""
        with self._changed:
            self._issued += 1
            return self._issued - 1

    def wait(self, ticket: int, stop_event: threading.Event) -> bool:
        """Wait until every earlier ticket has passed; False if `stop_event` was set first."""
        with self._changed:
            while self._next < ticket:
                if stop_event.is_set():
                    return False
                self._changed.wait(0.5)
            return True

    def passed(self, ticket: int) -> None:
        """The ticket's chunk took its slot, or will send nothing (given up, nothing to send); idempotent."""
        with self._changed:
            if ticket < self._next:
                return
            self._passed.add(ticket)
            while self._next in self._passed:
                self._passed.remove(self._next)
                self._next += 1
            self._changed.notify_all()
