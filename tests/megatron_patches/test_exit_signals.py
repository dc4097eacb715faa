"""Preemption: SIGTERM to any one rank checkpoints every rank after one iteration, exit 0, exact resume."""

import os
import signal

from megatron_patches.exit_signals import ExitSignals
from tests.dist import run_on_ranks
from tests.megatron_patches.probe import train_with_probe
from tests.megatron_patches.training.test_train import _train, losses, tiny_args, two_channels


def test_sigterm_to_one_rank_stops_all_ranks_at_one_checkpoint_and_the_resume_is_exact(tmp_path, capfd):
    # The signal reaches rank 1 only (not rank 0, which alone reads the trigger files) during
    # iteration 3's hooks; every rank counts it in iteration 4's agreement and stops there.
    data = two_channels(tmp_path)
    common = (
        "parallel.pipeline_model_parallel_size=2",
        "train.train_iters=8",
        "checkpoint.save_interval=100",
    )
    assert run_on_ranks(_train, 2, tiny_args(tmp_path / "full", data, *common), timeout=300) == [0, 0]
    signalled = tiny_args(tmp_path / "run", data, *common, "patches.probe={signal: {3: [1, SIGTERM]}}")
    results = run_on_ranks(train_with_probe, 2, signalled, timeout=300)
    assert [code for code, _ in results] == [0, 0]
    assert [record["saves"] for _, record in results] == [[4], [4]]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert max(losses(tmp_path / "run")) == 4
    printed = capfd.readouterr().out
    assert "checkpoint and stop: SIGTERM or SIGUSR1 to any rank (preemption)" in printed  # the plan says so
    assert "stopping after iteration 4: exit signal SIGTERM" in printed
    assert run_on_ranks(_train, 2, tiny_args(tmp_path / "run", data, *common), timeout=300) == [0, 0]
    expected, got = losses(tmp_path / "full"), losses(tmp_path / "run")
    assert [got[i] for i in range(5, 9)] == [expected[i] for i in range(5, 9)]


def test_handlers_note_the_first_signal_and_are_restored_afterwards():
    before = signal.getsignal(signal.SIGUSR1)
    with ExitSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one changes nothing: the run already stops
        assert signals.received == "SIGUSR1"
        assert signals.reason(2, 8) == "exit signal SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before
    assert ExitSignals().reason(2, 8) == "exit signal on 2 of 8 ranks"  # another rank received it
