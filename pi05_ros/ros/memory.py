"""Giving freed memory back to the operating system after large input buffers were replaced by small ones.

glibc's malloc keeps freed blocks in its arenas for reuse, and raises its mmap threshold after a large block is
freed (up to 32 MiB), so the buffers and message copies of a burst of huge frames stay in the process's RSS after
the frames shrink. `malloc_trim(0)` returns the free pages of every arena. The node calls `HeapTrimmer.check`
once a second with the bytes its input buffers hold; it trims when that fell by at least `min_drop_bytes`.
No-op where there is no glibc. No ROS imports.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

MIN_DROP_BYTES = 4 * 2**20  # a smaller drop is not worth a trim (it walks every arena)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()  # resolved at import, not in a callback


def trim_heap() -> bool:
    """Return free heap memory to the OS; False where malloc_trim does not exist."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class HeapTrimmer:
    """Trims the heap once after the held input bytes drop (see the module docstring)."""

    def __init__(self, min_drop_bytes: int = MIN_DROP_BYTES) -> None:
        self._min_drop = min_drop_bytes
        self._peak = 0  # the most held since the last trim
        self.trims = 0

    def check(self, held_bytes: int) -> bool:
        """Called periodically; True when it trimmed."""
        if held_bytes >= self._peak:
            self._peak = held_bytes
            return False
        if self._peak - held_bytes < self._min_drop:
            return False
        self._peak = held_bytes
        self.trims += 1
        return trim_heap()
