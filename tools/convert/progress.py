"""A progress bar over the tensors a conversion writes, and its one-line summary."""

from __future__ import annotations

import resource
import sys
import time

import torch
from tqdm import tqdm

from megatron_patches.paths import human_bytes


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux's ``VmHWM`` where there is one: ``ru_maxrss`` survives ``exec``, so a converter started
    by a large process (a benchmark, a test run) would report its parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Progress:
    """Counts written tensors and bytes; ``quiet`` hides the bar but keeps the counts."""

    def __init__(self, command: str, total: int, quiet: bool = False):
        self.command = command
        self.tensors = 0
        self.bytes = 0
        self._start = time.perf_counter()
        self._bar = tqdm(
            total=total, desc=command, unit="tensor", file=sys.stderr, disable=quiet, leave=False
        )

    def expect(self, total: int) -> None:
        self._bar.total = total
        self._bar.refresh()

    def shard(self, label: str) -> None:
        self._bar.set_postfix_str(label, refresh=False)

    def add(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tensors += 1
        self.bytes += tensor.numel() * tensor.element_size()
        self._bar.update(1)
        return tensor

    def add_pieces(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        """One tensor given as pieces (see ``Entry.hf_pieces``)."""
        self.tensors += 1
        self.bytes += sum(piece.numel() * piece.element_size() for piece in pieces)
        self._bar.update(1)
        return pieces

    def summary(self) -> str:
        self._bar.close()
        seconds = time.perf_counter() - self._start
        return (
            f"{self.command}: {self.tensors} tensors, {human_bytes(self.bytes)}, {seconds:.1f} s, "
            f"peak RSS {human_bytes(peak_rss_bytes())}"
        )
