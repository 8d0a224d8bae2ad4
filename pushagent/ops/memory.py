"""Process-wide memory policy for the push agent.

A chunk body is tens of MB and lives for one request. glibc raises its mmap
threshold after the first such buffer is freed, so the following ones come
from the heap, fragment it, and the peak RSS grows far past the bytes in use.
A fixed threshold keeps every large buffer in its own mapping, returned to
the OS when freed: memory stays bounded by `concurrency x chunk_bytes`.
"""

import ctypes

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1024 * 1024


def return_large_buffers_to_os() -> bool:
    """Fix glibc's mmap threshold at 1 MiB; False (and harmless) on other C libraries."""
    try:
        libc = ctypes.CDLL(None)  # the running process, which has libc loaded
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
