"""Preemption: SIGTERM or SIGUSR1 ends a run like ``touch stop``: checkpoint, then exit 0.

Slurm sends SIGTERM before it kills a job (at the time limit, on preemption), and the signal
of ``sbatch --signal=USR1@120`` that long before; torchrun forwards SIGTERM to every rank.
As Megatron-LM's ``--exit-signal-handler``, the handler only notes the signal; the training
loop acts on it at the end of an iteration. A signal may reach any subset of the ranks, at
different moments: every rank adds 1 to a count the loop all-reduces after every iteration
(``training/agreement.py``), so all ranks see the same count after the same iteration, and
the first iteration at which it is above zero is the one every rank checkpoints and stops at.

System calls restart after the handler (``siginterrupt(False)``), so a signal that lands
inside a gloo/NCCL call or a checkpoint write does not make it fail with EINTR.
"""

from __future__ import annotations

import signal
import threading

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitSignals:
    """While entered (main thread only), notes the first exit signal this process receives."""

    def __init__(self, signals: tuple[signal.Signals, ...] = EXIT_SIGNALS) -> None:
        self.signals = signals
        self.received: str | None = None  # e.g. "SIGTERM"
        self._previous: dict[signal.Signals, object] = {}

    def _note(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> ExitSignals:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._note)
                signal.siginterrupt(sig, False)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
        self._previous.clear()

    def reason(self, signalled_ranks: int, world_size: int) -> str:
        """The stop reason to log, naming the signal where this rank received it."""
        if self.received:
            return f"exit signal {self.received}"
        return f"exit signal on {signalled_ranks} of {world_size} ranks"
