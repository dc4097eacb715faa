"""What every rank must agree on after an iteration: rank 0's flags and the count of signalled ranks.

Some per-iteration decisions can only be taken on one rank without ranks
disagreeing on the iteration: a file touched in the run directory
(``save_trigger``), a wall clock (``checkpoint.save_interval_minutes``). Global
rank 0 answers them (``Hook.rank0_flags``); and any subset of the ranks may have
received SIGTERM/SIGUSR1 (``megatron_patches.exit_signals``). Both reach every
rank through one explicit all-reduce (a SUM) of a small int64 tensor, right
after the loss all-reduce and before the update: element ``j`` is flag ``j``
(1 on rank 0 if it holds, 0 elsewhere), the last element is each rank's 1 if it
was signalled. So all ranks save or stop after the same iteration.

Why its own collective: the flags used to be bit-packed into the loss
all-reduce's token count to save one small gloo all-reduce (~0.1-0.3 ms on the
2-core CPU VM, a few us on NCCL); on an iteration of realistic length that is
within noise (``bench/patches_overhead.py --preset tiny-long``), and a tensor
of named 0/1 elements needs no bit layout, no room check and no limit on the
number of flags or ranks. The hook API never sees this mechanism: hooks name
their flags (``flag_names``), answer them (``rank0_flags``) and read
``report.flags``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_patches.hooks import Hook

LOOP_FLAGS = ("loop.wall_clock_save",)  # the loop's own rank-0 decision (checkpoint.save_interval_minutes)


def rank0_flag_names(hooks: list[Hook]) -> list[str]:
    """Every rank-0 flag of a run in element order: the loop's, then each hook's ``<patch>.<flag>``."""
    return [*LOOP_FLAGS, *(f"{hook.name}.{flag}" for hook in hooks for flag in hook.flag_names)]


@dataclass(frozen=True)
class Agreed:
    """The iteration's shared answers, equal on every rank."""

    flags: dict[str, bool]  # "<patch>.<flag>" (and the loop's) -> rank 0's answer
    exit_signals: int  # ranks that have received an exit signal


def flag_vector(names: list[str], answers: set[str], signalled: bool) -> list[int]:
    """This rank's summand: 0/1 per flag name (rank 0's ``answers``), then 1 if it was signalled."""
    unknown = answers.difference(names)
    if unknown:
        raise RuntimeError(f"rank0_flags answered {sorted(unknown)}, not in the hooks' flag_names")
    return [int(name in answers) for name in names] + [int(signalled)]


def read_vector(names: list[str], summed: list[int]) -> Agreed:
    """The all-reduced vector back as named flags and a count of signalled ranks."""
    return Agreed({name: bool(value) for name, value in zip(names, summed, strict=False)}, summed[-1])


class RankAgreement:
    """The run's flag names and the one collective that shares their answers."""

    def __init__(self, hooks: list[Hook], device: torch.device) -> None:
        self.hooks = hooks
        self.names = rank0_flag_names(hooks)
        self.device = device

    def exchange(self, rank0_answers: Callable[[], set[str]], signalled: bool) -> Agreed:
        """Collective. ``rank0_answers`` (called on global rank 0 only) names the flags that hold."""
        answers = rank0_answers() if torch.distributed.get_rank() == 0 else set()
        mine = flag_vector(self.names, answers, signalled)
        values = torch.tensor(mine, dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(values)
        return read_vector(self.names, values.tolist())
