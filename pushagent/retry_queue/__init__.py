"""The durable retry queue: one protocol (base.py), one module per backend."""

from .base import QueueItem, RetryQueue, open_queue, retry_delay

__all__ = ["QueueItem", "RetryQueue", "open_queue", "retry_delay"]
