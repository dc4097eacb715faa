"""One writer thread beside the converting thread, so file writes overlap the next tensor's re-layout.

The converting thread reads and re-lays tensors (page faults, copies) while the writer
thread hands the previous ones to the kernel; both heavy parts release the GIL
(``write``/``PyTorchFileWriter.write_record`` and torch's copy kernels), so on two cores
a conversion costs about the larger of the two instead of their sum. The queue is
bounded: at most ``depth`` jobs wait, so memory stays a few tensors whatever the model.
A job's failure is raised in the converting thread, at its next ``submit`` or at ``drain``.
:meth:`BackgroundWriter.defer` runs a function in the converting thread once the jobs
submitted so far are done: a source drops the input pages it read when released, and
released before the writer thread read them they would be mapped again and stay so.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

_STOP = None


class BackgroundWriter:
    """Runs submitted jobs in order on one thread; ``drain`` waits for them and re-raises a failure."""

    def __init__(self, depth: int = 2) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._submitted = 0
        self._done = 0  # counted by the writer thread
        self._deferred: list[tuple[int, Callable[[], None]]] = []  # (jobs that must be done, function)
        self._thread = threading.Thread(target=self._run, name="convert-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            if self._error is None:  # after a failure, later jobs are dropped, not run
                try:
                    job()
                    self._done += 1
                except BaseException as err:  # noqa: BLE001 - re-raised in the converting thread
                    self._error = err

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise_failure()
        self._run_deferred()
        self._jobs.put(job)
        self._submitted += 1

    def defer(self, function: Callable[[], None]) -> None:
        """Run ``function`` here once every job submitted so far is done (at a later submit or drain)."""
        self._deferred.append((self._submitted, function))
        self._run_deferred()

    def _run_deferred(self) -> None:
        while self._deferred and self._deferred[0][0] <= self._done:
            self._deferred.pop(0)[1]()

    def drain(self) -> None:
        """Wait for every submitted job (the thread ends); raise the first failure, else run the deferred."""
        self._stop()
        self._raise_failure()
        self._run_deferred()

    def abort(self) -> None:
        """Drop the jobs not started yet and end the thread (the converting thread is failing)."""
        if self._error is None:
            self._error = RuntimeError("aborted")  # makes _run skip what is queued
        self._stop()
        self._error = None

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()
