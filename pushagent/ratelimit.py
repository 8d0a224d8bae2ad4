"""A token bucket shared by all workers: stay under the key's quota instead of learning it from 429s."""

import threading
import time


class TokenBucket:
    """`rate_per_minute` tokens a minute, bursts of up to `burst` tokens."""

    def __init__(self, rate_per_minute: float, burst: int = 1, clock=time.monotonic):
        self.rate_per_second = rate_per_minute / 60.0
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._clock = clock
        self._updated = clock()
        self._lock = threading.Lock()

    def acquire(self, stop_event: threading.Event | None = None) -> bool:
        """Wait for one token; False if `stop_event` was set while waiting."""
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate_per_second)
                self._updated = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return True
                wait = (1 - self._tokens) / self.rate_per_second
            if stop_event is not None:
                if stop_event.wait(wait):
                    return False
            else:
                time.sleep(wait)
