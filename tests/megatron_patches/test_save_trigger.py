"""``touch save`` / ``touch stop``: one rank looks, every rank saves after the same iteration."""

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.hooks import enable_patch
from megatron_patches.save_trigger import requested
from megatron_patches.training import run
from megatron_patches.training.config import load_config
from tests.dist import run_on_ranks
from tests.megatron_patches.probe import train_with_probe
from tests.megatron_patches.training.test_train import losses, tiny_args, two_channels


def test_trigger_files_and_the_paths_printed_at_start_up(tmp_path, capsys):
    save, stop = tmp_path / "save", tmp_path / "stop"
    assert requested(save, stop) == [0, 0]
    stop.touch()
    assert requested(save, stop) == [0, 1]
    args = tiny_args(tmp_path / "run", two_channels(tmp_path), "patches.save_trigger=true", "--dry-run")
    assert run.main(args) == 0
    printed = capsys.readouterr().out
    assert f"force a checkpoint: touch {(tmp_path / 'run').resolve()}/save" in printed
    assert f"checkpoint and stop: touch {(tmp_path / 'run').resolve()}/stop" in printed
    without = tiny_args(tmp_path / "run", two_channels(tmp_path), "--dry-run")
    assert run.main(without) == 0
    assert "touch" not in capsys.readouterr().out  # no promise the run would not keep


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"save_file": "/tmp/save"}, "save_file must be a file name inside run_dir"),
        ({"stop_file": "../stop"}, "stop_file must be a file name inside run_dir"),
        ({"save_file": "x", "stop_file": "x"}, "save_file and stop_file are the same file"),
        ({"interval": 3}, "unknown config key 'patches.save_trigger.interval'"),
        ({"stop_fle": "x"}, "unknown config key 'patches.save_trigger.stop_fle'; did you mean 'stop_file'?"),
        ({"save_file": 3}, "config key 'patches.save_trigger.save_file' expects str, got 3"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ConfigError) as err:
        enable_patch("save_trigger", options, load_config(None, ["run_dir=/tmp/r"]))
    assert message in str(err.value)


def test_touch_save_then_stop_on_two_pipeline_stages(tmp_path):
    # The last rank touches the files (as a user's shell would, at any moment);
    # only rank 0 looks. `save` after iteration 2 is seen at 3 by every rank; a
    # `save` appearing while the interval checkpoint of 4 is written is absorbed
    # by it; `stop` after 6 ends the run with a complete checkpoint of 7.
    run_dir = tmp_path / "run"
    args = tiny_args(
        run_dir,
        two_channels(tmp_path),
        "parallel.pipeline_model_parallel_size=2",
        "train.train_iters=12",
        "checkpoint.save_interval=4",
        "checkpoint.keep_last=10",
        "patches.save_trigger=true",
        "patches.probe={touch: {2: save, 6: stop}, touch_during_save: [4, save]}",
    )
    results = run_on_ranks(train_with_probe, 2, args, timeout=300)
    assert [code for code, _ in results] == [0, 0]
    assert [record["saves"] for _, record in results] == [[3, 4, 7], [3, 4, 7]]
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "iter_0000003",
        "iter_0000004",
        "iter_0000007",
        "latest_checkpointed_iteration.txt",
    ]
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "7"
    assert (checkpoints / "iter_0000007" / "metadata.json").is_file()
    assert max(losses(run_dir)) == 7
    assert not (run_dir / "save").exists() and not (run_dir / "stop").exists()
