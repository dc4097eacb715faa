"""Let a conversion reuse the memory of the tensors it has written instead of faulting in fresh pages.

A conversion allocates and frees one tensor after another (each TP shard, each merged
tensor), most larger than glibc's largest mmap threshold (32 MiB), so each is a fresh
``mmap``: every page faults and is zeroed by the kernel before the copy into it, and is
unmapped again on free. Measured on the 7B shapes, that costs about twice the copy
itself. With mmap off and a high trim threshold, freed tensors stay in the heap and
the next one lands in pages already resident; the streaming writers hold only a few
tensors at a time, so the heap stays that small. Process-wide, so only the CLI sets it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_KEEP_BYTES = 512 << 20  # freed memory the heap keeps (above the largest 7B tensor, 250 MB)


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to keep and reuse freed tensors; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): allocation stays as it was
        return False
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
