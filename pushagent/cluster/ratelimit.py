"""A token bucket shared by all workers: stay under the key's quota instead of learning it from 429s.

The number of parallel requests has its own limit (concurrency.py).

When the cluster pushes back anyway (429, rejected executions), the bucket
halves its rate (at most once per `DECREASE_EVERY` seconds, so that the
answers of one burst count once) and climbs back by an eighth of the
configured rate per clean answer: additive increase, multiplicative
decrease, between a sixteenth of the configured rate and the rate itself.
"""

import os
import threading
import time

DECREASE_EVERY = 1.0      # seconds: one halving per burst of rejections
FLOOR_DIVISOR = 16        # the rate never drops below requests_per_minute / 16
STEP_DIVISOR = 8          # each clean answer gives back requests_per_minute / 8


class TokenBucket:
    """`rate_per_minute` tokens a minute, bursts of up to `burst` tokens; slows down on push-back."""

    def __init__(self, rate_per_minute: float, burst: int = 1, clock=time.monotonic):
        self.ceiling = rate_per_minute
        self.rate_per_minute = rate_per_minute
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._clock = clock
        self._updated = clock()
        self._last_decrease = float("-inf")
        self._lock = threading.Lock()

    def acquire(self, stop_event: threading.Event | None = None) -> bool:
        """Wait for one token; False if `stop_event` was set while waiting."""
        while True:
            with self._lock:
                self._refill()
                if self._tokens >= 1:
                    self._tokens -= 1
                    return True
                wait = (1 - self._tokens) * 60.0 / self.rate_per_minute
            # Re-checked at least every second, so a rate raised meanwhile takes effect; never a zero wait,
            # which rounding (1 - 0.99999...) can produce and which would spin.
            wait = min(max(wait, 0.001), 1.0)
            if stop_event is not None:
                if stop_event.wait(wait):
                    return False
            else:
                time.sleep(wait)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate_per_minute / 60.0)
        self._updated = now

    def slow_down(self) -> float:
        """The cluster pushed back: halve the rate (once per burst). Returns the rate in use."""
        with self._lock:
            now = self._clock()
            if now - self._last_decrease >= DECREASE_EVERY:
                self._refill()
                self._last_decrease = now
                self.rate_per_minute = max(self.ceiling / FLOOR_DIVISOR, self.rate_per_minute / 2)
                self._tokens = min(self._tokens, 0.0)   # the burst allowance is spent: no catch-up
            return self.rate_per_minute

    def speed_up(self) -> float:
        """A clean answer: raise the rate by a step, up to the configured one. Returns the rate in use."""
        with self._lock:
            if self.rate_per_minute < self.ceiling:
                self._refill()
                self.rate_per_minute = min(self.ceiling, self.rate_per_minute + self.ceiling / STEP_DIVISOR)
            return self.rate_per_minute


def task_rate(requests_per_minute: float, environ=None) -> float:
    """This process's share of the key's budget: the tasks of a Slurm array split it evenly.

    `requests_per_minute` is what the API key may send; eight array tasks
    each sending all of it would send eight times that.
    """
    environ = os.environ if environ is None else environ
    count = environ.get("SLURM_ARRAY_TASK_COUNT", "")
    tasks = int(count) if count.isdigit() and int(count) > 1 else 1
    return requests_per_minute / tasks


def bucket_for(config, environ=None) -> TokenBucket:
    """The run's token bucket: this task's share of requests_per_minute, bursts of `concurrency`."""
    return TokenBucket(task_rate(config.requests_per_minute, environ), burst=config.concurrency)
