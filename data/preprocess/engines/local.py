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
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
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


def run_tasks(fn: Callable[[Any, Progress], Stats], tasks: Sequence[Any], workers: int, desc: str) -> Stats:
    """Run `fn(task, progress)` for every task on `workers` processes and add up the returned stats."""
    total = Stats()
    for stats in map_tasks(fn, tasks, workers, desc):
        total += stats
    return total


def map_tasks(fn: Callable[[Any, Progress], Any], tasks: Sequence[Any], workers: int, desc: str) -> list:
    """Run `fn(task, progress)` for every task on `workers` processes; the result of each, in task order."""
    results: list = [None] * len(tasks)
    _each_result(fn, tasks, workers, desc, results.__setitem__)
    return results


def reduce_tasks(
    fn: Callable[[Any, Progress], Any],
    tasks: Sequence[Any],
    workers: int,
    desc: str,
    combine: Callable[[Any, Any], Any],
) -> Any:
    """Run `fn(task, progress)` for every task and merge each result into the total as it arrives, so
    memory holds the total and the results in flight, not every task's (`combine` must not mind the
    order: tasks finish in any order)."""
    total: Any = _NOTHING

    def take(_: int, result: Any) -> None:
        nonlocal total
        total = result if total is _NOTHING else combine(total, result)

    _each_result(fn, tasks, workers, desc, take)
    return total


_NOTHING = object()


def _each_result(
    fn: Callable[[Any, Progress], Any],
    tasks: Sequence[Any],
    workers: int,
    desc: str,
    take: Callable[[int, Any], None],
) -> None:
    bar = _Bar(desc, None)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for index, task in enumerate(tasks):
                take(index, _run_here(fn, task, bar))
        else:
            _run_pool(fn, tasks, workers, bar, take)
    finally:
        bar.close()


def _run_here(fn: Callable[[Any, Progress], Any], task: Any, bar: _Bar) -> Any:
    progress = Progress(bar.update, every_s=0.2)
    result = fn(task, progress)
    progress.flush()
    return result


def _run_pool(
    fn: Callable[[Any, Progress], Any],
    tasks: Sequence[Any],
    workers: int,
    bar: _Bar,
    take: Callable[[int, Any], None],
) -> None:
    ctx = mp.get_context("spawn")
    progress_queue = ctx.Queue()
    with ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(progress_queue, os.getpid()),
    ) as pool:
        index_of = {pool.submit(_call_in_worker, fn, task): i for i, task in enumerate(tasks)}
        pending = set(index_of)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(progress_queue, bar)
                for future in done:  # result() re-raises a worker's exception, ConfigError included
                    take(index_of.pop(future), future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        _drain(progress_queue, bar)


def _drain(progress_queue: Any, bar: _Bar) -> None:
    while True:
        try:
            docs, nbytes = progress_queue.get_nowait()
        except queue.Empty:
            return
        bar.update(docs, nbytes)
