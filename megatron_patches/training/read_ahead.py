"""``data.num_workers``: read the next iterations' micro-batches while this one computes.

Megatron-LM's ``DataLoader`` workers prepare batches ahead of the step; here a thread
pool does the same for the trainer's reads, which are pure functions of their
arguments (dataset, sample offset, phase, DP rank, skipped windows). A read runs
ahead only with the exact arguments the trainer will ask for; when they change in
between (a roll-back skipped a window, a phase began), the stale result is dropped
and the batch is read again, so the batches never differ from reading them in place.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any


def _key(read: partial) -> tuple:
    return (read.func, read.args, tuple(sorted(read.keywords.items())))


class ReadAhead:
    """Runs ``partial`` reads in ``workers`` threads ahead of need (no threads when 0)."""

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="read-ahead") if workers > 0 else None
        self._pending: list[tuple[tuple, Future]] = []

    def get(self, read: partial, upcoming: list[partial]) -> Any:
        """``read()``, taken from a read started earlier when one has exactly its arguments;
        then start ``upcoming`` (the next iterations' reads) in the background."""
        if self._pool is None:
            return read()
        wanted = _key(read)
        found = next((future for key, future in self._pending if key == wanted), None)
        self._pending = [(key, future) for key, future in self._pending if key != wanted]
        self._start([u for u in upcoming if _key(u) != wanted])
        return found.result() if found is not None else read()

    def _start(self, upcoming: list[partial]) -> None:
        keys = [_key(u) for u in upcoming]
        kept = []
        for key, future in self._pending:
            if key in keys:
                kept.append((key, future))
            else:
                future.cancel()  # consumed, or stale: its arguments are no longer the trainer's
        started = [key for key, _ in kept]
        for key, read in zip(keys, upcoming, strict=True):
            if key not in started:
                kept.append((key, self._pool.submit(read)))
        self._pending = kept
