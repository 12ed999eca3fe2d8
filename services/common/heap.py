"""glibc's allocator in a replica: freed memory stays with the process for the next request.

Each request allocates and frees the same few-megabyte buffers (tensors, message bytes). By default glibc hands
large freed blocks back to the kernel (blocks above its mmap threshold are unmapped, the top of a heap past its trim
threshold is trimmed), and the next request faults every page in again, which is slow on virtual machines. Measured
here during single-image interventions: ~5 000 page faults per request in the task-head replica (~20 MB), none in a
plain process running the same model code in its main thread. The model replicas use it; the gateway does not (it
computes nothing, and with it the gateway's memory crept up by ~13 % over a 10-minute soak).
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size come from the heap (glibc's largest allowed value on 64-bit)."""
TRIM_THRESHOLD = 256 << 20
"""A heap returns memory to the kernel only when more than this lies free at its top (a request's buffers are tens
of megabytes; a burst of large batches is still given back)."""


def keep_freed_memory() -> bool:
    """Set both thresholds for this process (this also turns off glibc's own adjusting of them); False where the C
    library has no ``mallopt`` (not glibc) or refuses a value."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
