"""``run_dir/finished.json``: this run directory's newest start trained all of ``train.train_iters``.

A job that brings itself back (``launch/slurm_pretrain.sbatch``) requeues until the marker exists.
Rank 0 removes it when a run starts (before any rank trains) and writes it, atomically, when the
loop ends at ``train_iters`` (or a stop lands on that iteration after its checkpoint). So a run
that is killed, stopped early (stop file, ``exit_interval``, an exit signal, a spike) or refused
has none, and a relaunch with more iterations loses the old one at its start and gets a new one
only when it reaches the new count; a relaunch of a finished run (same count) resumes at the end,
trains nothing and writes it again. Removing it at the start rather than comparing counts keeps
one rule for every kind of relaunch: the marker speaks for the newest start only.
"""

from __future__ import annotations

import time
from pathlib import Path

from megatron_patches.paths import write_json_atomic

FINISHED_FILE = "finished.json"


def clear(run_dir: Path) -> None:
    """A run starts: whatever an earlier start finished does not say this one will."""
    (run_dir / FINISHED_FILE).unlink(missing_ok=True)


def mark(run_dir: Path, iteration: int, train_iters: int, saved: bool) -> None:
    """All iterations trained; ``saved``: the last one is in a checkpoint."""
    record = {
        "iteration": iteration,
        "train_iters": train_iters,
        "checkpoint_saved": saved,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(run_dir / FINISHED_FILE, record)
