"""glibc's allocator, tuned for tensors: freed memory is reused instead of handed back to the OS.

By default glibc maps each allocation above an adaptive threshold (128 KiB, rising to at most
32 MiB) on its own and unmaps it on free, and shrinks the heap whenever more than twice that
threshold is free at its top. A forward pass's MiB-sized temporaries of mixed sizes keep
crossing both, so their memory arrives as fresh pages that the kernel faults in and zeroes one at
a time: 1.1-1.7 million page faults per pass of 400 contexts through SmolLM2's block 6, at 1.4x
the time of the same pass with the memory reused (BENCHMARKS.md, "glibc's allocator"). PyTorch's
CPU tensors come from malloc, so the fix is two fixed malloc settings, made once at import.
Users who set them themselves (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or a glibc.malloc
tunable in GLIBC_TUNABLES) keep their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap and are reused (glibc's adaptive maximum)
TRIM_THRESHOLD = 64 << 20  # free memory kept at the heap's top; 256 MiB cost 10 % more peak memory for nothing


def reuse_freed_memory() -> bool:
    """Apply the settings where the C library is glibc; True if they were applied."""
    users_own = {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ)
    if users_own or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without it): nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
