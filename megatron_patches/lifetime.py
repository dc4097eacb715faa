"""Child processes that die with their parent.

A training rank, a conversion or ``data.preprocess run`` killed with SIGKILL
cannot clean up after itself: its worker processes (preprocess pools,
dist_checkpointing's per-rank writer processes, multiprocessing's resource
tracker) would live on with parent 1, each holding hundreds of MB. Linux's
``PR_SET_PDEATHSIG`` asks the kernel to signal a process when the thread that
created it exits, which is the one mechanism that survives SIGKILL of the
parent. :func:`die_with_parent` sets it from inside the child (a pool's
``initializer``, or the first thing a spawned target runs) and then checks
that the parent did not already die before the call (the race the man page
warns about). On other systems it is a no-op: there a parent-liveness check
in the worker loop (:func:`parent_alive`) is the fallback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL, parent_pid: int | None = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits; True where supported.

    ``parent_pid`` is the pid the caller expects as parent (pass ``os.getpid()``
    from the parent when it is known); if the parent is already gone the
    process exits at once instead of running as an orphan.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if not parent_alive(parent_pid):
        os._exit(1)  # the parent died before prctl took effect: nobody will read our results
    return True


def parent_alive(parent_pid: int | None = None) -> bool:
    """False once this process has been re-parented (its parent died)."""
    current = os.getppid()
    if parent_pid is not None:
        return current == parent_pid
    return current != 1
