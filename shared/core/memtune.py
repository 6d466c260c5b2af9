"""Keep glibc from returning, and then faulting in again, the buffers of every instance.

A receiver allocates several half-megabyte buffers per instance (the PDUs,
the data set, the encoded file) and frees them a moment later. With glibc's
adaptive defaults a process sometimes settles into giving that memory back
to the kernel after each instance and faulting it in again for the next:
about 130 page faults and +0.35 ms of CPU per 512 kB instance (+30 % for the
no-op SCP of bench/), in some runs and not others. Fixed thresholds keep such
buffers on the heap: large blocks come from the heap up to
:data:`MMAP_THRESHOLD` and free heap is kept up to :data:`TRIM_THRESHOLD`,
at the price of that much memory a process may keep.

``PACSBRIDGE_MALLOC_TUNE=0`` leaves glibc's defaults; a libc other than
glibc is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from pacsbridge.shared.core.config import initial_settings

__all__ = ["tune_malloc", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations up to this size come from the heap (glibc's default starts at 128 kB and adapts).
MMAP_THRESHOLD = 16 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse instead of returned.
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_malloc() -> bool:
    """Set the two thresholds in this process; True when they were set."""
    if not initial_settings().malloc_tune:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the thresholds; keeping glibc's defaults")
    return ok
