"""How long each start-up phase took, from process start to the first loss (one log line).

Megatron launches are notorious for minutes between ``bash train.sh`` and the first
loss; the line names where they go: imports, process groups, model build, checkpoint
load, dataset indices, first iteration.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager


def seconds_since_process_start() -> float:
    """Wall-clock seconds this process has existed (Linux ``/proc``); 0.0 where unknown."""
    try:
        with open("/proc/self/stat") as stat:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            return float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class StartupTimer:
    """Phases timed in order; ``imports`` is the time before the timer existed."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {"imports": seconds_since_process_start()}
        self.origin = time.perf_counter() - self.phases["imports"]

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def first_loss(self, dataset_seconds: float, iteration_seconds: float) -> str:
        """Record the first phase's dataset build and the first iteration; the line to log."""
        self.phases["dataset indices"] = dataset_seconds
        self.phases["first iteration"] = iteration_seconds
        total = time.perf_counter() - self.origin
        parts = ", ".join(f"{name} {value:.1f} s" for name, value in self.phases.items())
        return f"start-up: {parts}; first loss {total:.1f} s after the process started"
