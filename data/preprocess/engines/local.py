"""Run one function over many tasks (one input file, or one byte range of one, each) on all cores.

Workers are spawned processes; each reports (docs, bytes) increments through a queue so that the
parent can draw one progress bar with docs/s and MB/s. A task function returns a :class:`Stats`;
the parent adds them up. With ``workers == 1`` tasks run in this process (no pickling, easy to
debug, and what the tests use for speed).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

from megatron_patches.lifetime import die_with_parent

from ..report import Stats

_progress_queue: Any = None  # set in each worker by _init_worker


class Progress:
    """What a task calls as it goes: `progress.update(docs, nbytes)`; batched to keep the queue cheap."""

    def __init__(self, sink: Callable[[int, int], None], every_s: float = 0.5):
        self._sink, self._every, self._docs, self._bytes, self._last = sink, every_s, 0, 0, time.time()

    def update(self, docs: int, nbytes: int) -> None:
        self._docs += docs
        self._bytes += nbytes
        now = time.time()
        if now - self._last >= self._every:
            self.flush()
            self._last = now

    def flush(self) -> None:
        if self._docs or self._bytes:
            self._sink(self._docs, self._bytes)
            self._docs = self._bytes = 0


def _init_worker(progress_queue: Any, parent_pid: int) -> None:
    # A parent killed with SIGKILL cannot shut the pool down: its workers would block on the task
    # queue forever, and multiprocessing's resource tracker (whose pipe every worker inherits)
    # would wait for them. Dying with the parent ends both.
    die_with_parent(parent_pid=parent_pid)
    global _progress_queue
    _progress_queue = progress_queue


def _call_in_worker(fn: Callable[..., Stats], task: Any) -> Stats:
    progress = Progress(lambda d, b: _progress_queue.put((d, b)))
    stats = fn(task, progress)
    progress.flush()
    return stats


class _Bar:
    def __init__(self, desc: str, total_bytes: int | None):
        self.start = time.time()
        self.bar = tqdm(desc=desc, unit="docs", total=None, mininterval=1.0, disable=None, leave=False)
        self.nbytes = 0

    def update(self, docs: int, nbytes: int) -> None:
        self.nbytes += nbytes
        self.bar.update(docs)
        mbps = self.nbytes / max(time.time() - self.start, 1e-9) / 1e6
        self.bar.set_postfix_str(f"{mbps:.2f} MB/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


@contextmanager
def progress_bar(desc: str) -> Iterator[Progress]:
    """The bar of :func:`run_tasks` for work that runs in this process and cannot be split into
    tasks (train-tokenizer gathers its sample in the parent)."""
    bar = _Bar(desc, None)
    progress = Progress(bar.update, every_s=0.2)
    try:
        yield progress
        progress.flush()
    finally:
        bar.close()


def run_tasks(fn: Callable[[Any, Progress], Stats], tasks: Sequence[Any], workers: int, desc: str) -> Stats:
    """Run `fn(task, progress)` for every task on `workers` processes and add up the returned stats."""
    total = Stats()
    for stats in map_tasks(fn, tasks, workers, desc):
        total += stats
    return total


def map_tasks(
    fn: Callable[[Any, Progress], Stats], tasks: Sequence[Any], workers: int, desc: str
) -> list[Stats]:
    """Run `fn(task, progress)` for every task on `workers` processes; the stats of each, in task order."""
    bar = _Bar(desc, None)
    try:
        if workers <= 1 or len(tasks) <= 1:
            return [_run_here(fn, task, bar) for task in tasks]
        return _run_pool(fn, tasks, workers, bar)
    finally:
        bar.close()


def _run_here(fn: Callable[[Any, Progress], Stats], task: Any, bar: _Bar) -> Stats:
    progress = Progress(bar.update, every_s=0.2)
    stats = fn(task, progress)
    progress.flush()
    return stats


def _run_pool(
    fn: Callable[[Any, Progress], Stats], tasks: Sequence[Any], workers: int, bar: _Bar
) -> list[Stats]:
    ctx = mp.get_context("spawn")
    progress_queue = ctx.Queue()
    with ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(progress_queue, os.getpid()),
    ) as pool:
        futures = [pool.submit(_call_in_worker, fn, task) for task in tasks]
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(progress_queue, bar)
                for future in done:
                    future.result()  # re-raises a worker's exception, ConfigError included
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        _drain(progress_queue, bar)
    return [future.result() for future in futures]


def _drain(progress_queue: Any, bar: _Bar) -> None:
    while True:
        try:
            docs, nbytes = progress_queue.get_nowait()
        except queue.Empty:
            return
        bar.update(docs, nbytes)
