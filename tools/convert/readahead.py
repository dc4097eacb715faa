"""Ask the kernel to read the file pages behind memory-mapped tensors now, in large requests.

Converters read their inputs through mappings (safetensors views, ``torch.load(mmap=True)``
rank files, mapped ``torch_dist`` chunks). From a cold page cache, touching a mapping
faults its file in a few pages at a time, each fault waiting for the disk.
``madvise(MADV_WILLNEED)`` on a tensor's range starts reading all of it at once; the
writer thread then finds the pages arriving or already there. Tensors are read ahead
when a source hands them out, which is before the writer thread (a few tensors behind)
touches them. On memory that is not a file mapping the advice does nothing harmful.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
from collections.abc import Callable

import torch

_MADV_WILLNEED = 3  # Linux's value (mman-common.h); mmap.MADV_WILLNEED where Python exposes it


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name, use_errno=True).madvise if name else None
    except (OSError, AttributeError):  # no libc madvise (not Linux/glibc): reading stays as it was
        return None
    if function is not None:
        function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        function.restype = ctypes.c_int
    return function


def read_ahead(tensors: list[torch.Tensor]) -> None:
    """Start reading the pages under each (contiguous, CPU) tensor; a failure is ignored (only a hint)."""
    madvise = _madvise()
    if madvise is None:
        return
    advice = getattr(mmap, "MADV_WILLNEED", _MADV_WILLNEED)
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type != "cpu" or nbytes == 0 or not tensor.is_contiguous():
            continue
        begin = tensor.data_ptr()
        page_begin = begin - begin % mmap.PAGESIZE
        madvise(page_begin, begin + nbytes - page_begin, advice)
