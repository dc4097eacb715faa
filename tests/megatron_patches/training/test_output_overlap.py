"""run_dir and checkpoint.save never overlap the pretrained checkpoint: the run writes and prunes there."""

from pathlib import Path

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.training.config import load_config
from megatron_patches.training.validate import plan_run
from tests.megatron_patches.training.corpus import write_corpus
from tests.megatron_patches.training.test_train import tiny_args
from tools.convert import mcore_io


def _release(root: Path) -> Path:
    (root / mcore_io.RELEASE).mkdir(parents=True)
    (root / mcore_io.RELEASE / "weights").write_text("pretrained")
    mcore_io.write_tracker(root, mcore_io.RELEASE)
    return root


@pytest.mark.parametrize(
    ("run_dir", "pretrained", "extra", "message"),
    [
        (
            "run",
            "run/checkpoints",
            [],
            "run_dir {run} contains the input checkpoint.pretrained_checkpoint {ckpt},",
        ),
        ("run", "ckpt", ["checkpoint.save={ckpt}"], "checkpoint.save {ckpt} is the input"),
        (
            "ckpt/run",
            "ckpt",
            [],
            "run_dir {run} lies inside the input checkpoint.pretrained_checkpoint {ckpt},",
        ),
    ],
    ids=["default-save-dir", "save-is-pretrained", "run-inside-pretrained"],
)
def test_a_run_directory_overlapping_the_pretrained_checkpoint_is_refused(
    tmp_path, run_dir, pretrained, extra, message
):
    run, ckpt = tmp_path / run_dir, _release(tmp_path / pretrained)
    prefix = write_corpus(tmp_path / "data", "zh", 20, 128, seed=1)
    overrides = [f"checkpoint.pretrained_checkpoint={ckpt}", *(e.format(ckpt=ckpt) for e in extra)]
    with pytest.raises(ConfigError) as err:
        plan_run(load_config(None, tiny_args(run, [1, prefix], *overrides)), world_size=1)
    assert message.format(run=run, ckpt=ckpt) in str(err.value) and "\n" not in str(err.value)
    assert (ckpt / mcore_io.RELEASE / "weights").read_text() == "pretrained"
