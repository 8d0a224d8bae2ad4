"""The durable retry queue: one protocol (base.py), one module per backend; a URL picks the backend."""

import contextlib

from pushagent.errors import ConfigError
from pushagent.state.retry_queue.base import REPAIR, QueueItem, RetryQueue, redact_url, retry_delay

__all__ = ["REPAIR", "QueueItem", "RetryQueue", "configured_queue", "open_configured_queue", "open_queue",
           "retry_delay"]


def open_configured_queue(config) -> "RetryQueue":
    """The retry queue a configuration names (queue_url, max_attempts, max_retry_delay)."""
    return open_queue(config.resolved_queue_url, config.max_attempts, config.max_retry_delay)


@contextlib.contextmanager
def configured_queue(config):
    """open_configured_queue, closed when the block ends."""
    retry_queue = open_configured_queue(config)
    try:
        yield retry_queue
    finally:
        retry_queue.close()


def open_queue(url: str, max_attempts: int = 8, max_retry_delay: float = 6 * 3600) -> RetryQueue:
    """The backend named by `url`: sqlite:///path or redis://host:port/db (rediss:// for TLS)."""
    if url.startswith("sqlite:///"):
        from pushagent.state.retry_queue.sqlite_backend import SqliteQueue
        return SqliteQueue(url[len("sqlite://"):], max_attempts, max_retry_delay)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from pushagent.state.retry_queue.redis_backend import RedisQueue
        return RedisQueue(url, max_attempts, max_retry_delay)
    raise ConfigError(f"unsupported queue_url {redact_url(url)!r}: expected sqlite:///path or redis://host:port/db")
