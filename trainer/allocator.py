"""glibc's allocator, tuned for tensors: large blocks are reused instead of handed back to the OS.

By default glibc serves every allocation above 128 KiB-32 MiB with its own mmap and unmaps it on
free, so each of a forward pass's MiB-sized temporaries arrives as fresh pages that the kernel
faults in and zeroes, one page at a time: 8.5 million page faults in 400 contexts through
SmolLM2's block 6, and 1.3x the time of the same passes with the blocks reused (BENCHMARKS.md).
PyTorch's CPU tensors come from malloc, so the fix is two malloc settings, made once at import.
Users who set these two themselves (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or
GLIBC_TUNABLES) keep their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 64 << 20  # blocks below this come from the heap and are reused
TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap's top before it is returned


def reuse_large_blocks() -> bool:
    """Apply the settings where the C library is glibc; True if they were applied."""
    if {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without it): nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
