"""``train.manual_gc`` (Megatron-LM's ``--manual-gc``): Python's automatic collector off during the run.

Python's collector runs whenever allocations pass a threshold, so its pauses hit ranks at
different iterations and the others wait at the next collective; the loop collects on every rank
at the same points instead (:func:`collect`). Everything alive at the start (modules, model,
optimizer) is frozen out of the collector's scans (``gc.freeze``), so a collection costs what the
training iterations allocated, not a full scan of the process (~0.2 s here). The previous settings
are restored afterwards.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def automatic_gc_off(enabled: bool) -> Iterator[None]:
    """With ``enabled``: no automatic collection inside the block, the objects alive at its start frozen."""
    if not enabled:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def collect(enabled: bool) -> None:
    """One collection, when ``train.manual_gc`` is on: every rank calls it at the same point."""
    if enabled:
        gc.collect()
