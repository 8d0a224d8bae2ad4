"""The durable retry queue: one protocol (base.py), one module per backend."""

from .base import REPAIR, QueueItem, RetryQueue, configured_queue, open_configured_queue, open_queue, retry_delay

__all__ = ["REPAIR", "QueueItem", "RetryQueue", "configured_queue", "open_configured_queue", "open_queue",
           "retry_delay"]
