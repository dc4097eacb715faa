"""Contenders measured in turns: each runs in a process of its own, and they take turns by slices of
their input, one at a time, so that a shared machine's changing speed falls on all of them alike.

Measured one after the other, a 1-second contender and a 4-second baseline can meet different
machines: on the project's VM the speed moves by up to 25 % within a minute, so each round's ratio
moved as much. In turns, every contender works through its first slice, then every contender its
second, and so on, so each sees the same stretch of the machine's time, and a ratio of two CPU
times compares like with like. A contender's figure is still its own process's CPU time
(`time.process_time`) over its whole run; waiting for a turn costs no CPU time.

    def contender(inputs, turns: Turns) -> float:
        ...                      # set up: not timed
        with turns.timed() as clock:
            for item in inputs:
                work(item)
                turns.advance(size_of(item))   # may hand the machine over
        return total_bytes / clock.seconds

    in_turns({"ours": (contender, (inputs,), total_bytes), ...})   # {"ours": rate, ...}
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

SLICES = 20  # turns per contender; each contender's input is cut into this many equal byte shares


@dataclass
class Clock:
    seconds: float = 0.0


class Turns:
    """A contender's side: `advance(nbytes)` counts its progress and, at each slice boundary, hands
    the machine to the next contender and waits for its own next turn."""

    def __init__(self, conn: Connection, total_bytes: int, slices: int = SLICES):
        self._conn = conn
        self._slice = max(1, total_bytes // slices)
        self._done = 0
        self._next = self._slice

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        if self._done >= self._next:
            self._next += self._slice * (1 + (self._done - self._next) // self._slice)
            self._conn.send(("paused", None))
            self._conn.recv()

    @contextmanager
    def timed(self) -> Iterator[Clock]:
        """CPU time of the block; `advance` inside it pauses, which takes no CPU time."""
        clock = Clock()
        start = time.process_time()
        try:
            yield clock
        finally:
            clock.seconds = max(time.process_time() - start, 1e-9)


def _contender(conn: Connection, fn: Callable, args: tuple, total_bytes: int) -> None:
    conn.recv()  # the first turn
    try:
        conn.send(("done", fn(*args, Turns(conn, total_bytes))))
    except BaseException:  # the parent re-raises it with the contender's name
        conn.send(("error", traceback.format_exc()))


def in_turns(contenders: dict[str, tuple[Callable, tuple, int]]) -> dict[str, Any]:
    """Run `fn(*args, turns)` for each name -> (fn, args, total_bytes) in turns; their return values."""
    ctx = mp.get_context("spawn")  # fresh processes: no contender inherits another's heap or caches
    links: dict[str, Connection] = {}
    processes: dict[str, mp.process.BaseProcess] = {}
    for name, (fn, args, total_bytes) in contenders.items():
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_contender, args=(child, fn, args, total_bytes), daemon=True)
        process.start()
        links[name] = parent
        processes[name] = process
    results: dict[str, Any] = {}
    try:
        while len(results) < len(links):
            for name, link in links.items():
                if name in results:
                    continue
                link.send("go")
                kind, value = link.recv()
                if kind == "error":
                    raise RuntimeError(f"contender {name} failed:\n{value}")
                if kind == "done":
                    results[name] = value
    finally:
        for name, process in processes.items():
            if name in results:  # it has returned: let it exit
                process.join(timeout=30)
            if process.is_alive():  # still waiting for a turn (another contender failed)
                process.terminate()
    return results
