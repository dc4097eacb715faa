"""``run_dir/finished.json``: written when a run has trained all its iterations, and only then (what a
requeued Slurm job checks, ``launch/slurm_pretrain.sbatch``)."""

import json

from megatron_patches.training import run
from tests.dist import run_on_ranks
from tests.megatron_patches.training.test_train import tiny_args, two_channels


def _train_runs(runs: list[list[str]]) -> list[dict | None]:
    """Train each argument list in turn (one run directory); the marker after each, None: none."""
    markers = []
    for args in runs:
        assert run.main(args) == 0
        marker = next(a.split("=", 1)[1] for a in args if a.startswith("run_dir=")) + "/finished.json"
        try:
            with open(marker) as f:
                markers.append(json.load(f))
        except FileNotFoundError:
            markers.append(None)
    return markers


def test_only_a_run_that_trained_all_its_iterations_leaves_the_finished_marker(tmp_path):
    data = two_channels(tmp_path)

    def args(*extra: str) -> list[str]:
        return tiny_args(tmp_path / "run", data, "checkpoint.save_interval=2", *extra)

    runs = [
        args("train.train_iters=4", "train.exit_interval=2"),  # interrupted: stops (and saves) at 2
        args("train.train_iters=4"),  # resumed at 2, trains 3 and 4
        args("train.train_iters=6", "train.exit_interval=5"),  # more iterations: interrupted at 5
    ]
    [(interrupted, finished, extended)] = run_on_ranks(_train_runs, 1, runs)
    assert interrupted is None
    assert {k: finished[k] for k in ("iteration", "train_iters", "checkpoint_saved")} == {
        "iteration": 4,
        "train_iters": 4,
        "checkpoint_saved": True,
    }
    assert extended is None  # the finished run's marker went when the longer run started
