"""The outage budget: how long the cluster may answer nothing useful before a run stops.

A night-long push over a WAN meets cluster restarts, load balancer 502s and
read-only blocks that last minutes. Counting failed attempts stops a run
within seconds of such an outage; a budget in time (`outage_seconds`) rides
it out and still stops, with the last reason, when the cluster is really
gone. "Useful" is an answer in which the cluster took or judged at least one
document (indexed, current or refused for good); whole-request failures
(429, 5xx, connection errors, timeouts) and answers whose every item asks to
be retried are not.
"""

import threading
import time

import backoff

from pushagent.errors import ClusterUnavailableError


class OutageClock:
    """Shared by the workers of one run: the time of the last useful answer, and whether the budget ran out."""

    def __init__(self, budget_seconds: float, clock=time.monotonic):
        self.budget = budget_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._last_useful = clock()
        self._outage_s = 0.0
        self.last_error = None
        self.tripped = threading.Event()

    def useful(self) -> None:
        with self._lock:
            self._last_useful = self._clock()

    def left(self, streak_start: float, reason: str) -> float:
        """Seconds of budget left for a chunk that has got nothing useful since `streak_start`.

        The streak counts from the earlier of its own start and the run's last
        useful answer: in a total outage every chunk shares the run's clock,
        and a chunk the cluster keeps refusing while others pass has its own.
        """
        with self._lock:
            self.last_error = reason
            elapsed = self._clock() - min(streak_start, self._last_useful)
            self._outage_s = max(self._outage_s, elapsed)
            return self.budget - elapsed

    def run_left(self) -> float:
        """Seconds of budget left for the run as a whole (since its last useful answer)."""
        with self._lock:
            return self.budget - (self._clock() - self._last_useful)

    def now(self) -> float:
        return self._clock()

    def trip(self) -> None:
        self.tripped.set()

    def error(self) -> ClusterUnavailableError:
        return ClusterUnavailableError(
            f"the cluster answered nothing useful for {self._outage_s:.0f} s (outage_seconds is {self.budget:g}); "
            f"last error: {self.last_error}",
            hint="nothing is lost (push keeps its checkpoint, drain its queue): run the same command again "
                 "when the cluster answers, or raise outage_seconds to wait longer")


def backoff_delay(failures: int, base: float, cap: float, retry_after: float | None, left: float) -> float:
    """Capped exponential backoff with full jitter, at least `retry_after`, never past the budget `left`."""
    delay = backoff.full_jitter(min(cap, base * 2 ** max(0, failures - 1)))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return max(0.0, min(delay, left))
