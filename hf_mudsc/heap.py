"""Handing freed C-heap memory back to the operating system, for the stages that free large buffers.

glibc keeps pages freed by `free` in the process's heap (fragmented among small live blocks), so the resident size
of a merge stays at its highest point: calibration's per-batch feature buffers, a solve start's similarities and a
parent's RegMean Grams would each add to the next stage's peak. One wrapper, used by every stage that frees them.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def release_free_heap() -> None:
    """Hand memory the process freed back to the OS (glibc's `malloc_trim`; where it is absent, nothing happens)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
