"""Reading a run's TensorBoard curves back: one value per step, the newest, after a resume."""

import pytest

from megatron_patches.errors import ConfigError
from tools.eval.trends import tensorboard_scalars


def test_steps_logged_again_after_a_resume_read_as_the_resumed_runs_values(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    killed = SummaryWriter(str(tmp_path))  # logged iterations 1..6, checkpoint at 3, then killed
    for step in range(1, 7):
        killed.add_scalar("lm loss", 10.0 + step, step)
    killed.close()
    resumed = SummaryWriter(str(tmp_path))  # no purge_step: as event files written before it was used
    for step in range(4, 7):
        resumed.add_scalar("lm loss", 20.0 + step, step)
    resumed.add_scalar("lr", 0.5, 4)
    resumed.close()
    assert tensorboard_scalars(tmp_path) == {
        "lm loss": {1: 11.0, 2: 12.0, 3: 13.0, 4: 24.0, 5: 25.0, 6: 26.0},
        "lr": {4: 0.5},
    }


def test_a_purge_marker_drops_the_killed_runs_steps_the_resumed_run_has_not_reached(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    killed = SummaryWriter(str(tmp_path))
    for step in range(1, 7):
        killed.add_scalar("lm loss", 10.0 + step, step)
    killed.close()
    resumed = SummaryWriter(str(tmp_path), purge_step=5)  # as the trainer opens it, resuming at 4
    resumed.add_scalar("lm loss", 25.0, 5)
    resumed.close()
    assert tensorboard_scalars(tmp_path) == {"lm loss": {1: 11.0, 2: 12.0, 3: 13.0, 4: 14.0, 5: 25.0}}


def test_a_directory_without_event_files_is_named(tmp_path):
    with pytest.raises(ConfigError, match="holds no TensorBoard event files"):
        tensorboard_scalars(tmp_path)
