"""The trainer vets a checkpoint before it resumes or starts from one: planted code never runs."""

from pathlib import Path

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.training import run
from megatron_patches.training.config import load_config
from megatron_patches.training.validate import plan_run
from tests.dist import run_on_ranks
from tests.megatron_patches.test_safe_load import plant_in_metadata
from tests.megatron_patches.training.corpus import write_corpus
from tests.megatron_patches.training.test_train import _train, tiny_args
from tests.tools.convert.tiny import save_hf
from tools.convert import commands


def _refused(message: str, marker: Path, call, *args) -> None:
    with pytest.raises(ConfigError) as err:
        call(*args)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not marker.exists(), "the planted code ran"


def test_resume_refuses_planted_code_and_names_a_truncated_shard(tmp_path):
    data = [1, write_corpus(tmp_path / "data", "zh", 40, 128, seed=1)]
    assert run_on_ranks(_train, 1, tiny_args(tmp_path / "run", data, "train.train_iters=3"), timeout=300) == [
        0
    ]
    iter_dir = tmp_path / "run" / "checkpoints" / "iter_0000003"
    metadata = (iter_dir / ".metadata").read_bytes()
    resume = tiny_args(tmp_path / "run", data, "train.train_iters=6")
    marker = tmp_path / "ran"

    plant_in_metadata(iter_dir, marker)
    _refused(f"{iter_dir / '.metadata'} pickles posix.system", marker, run.main, resume)

    (iter_dir / ".metadata").write_bytes(metadata)
    shard = iter_dir / "__0_1.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    _refused(f"{shard} is truncated", marker, run.main, resume)


def test_pretrained_checkpoint_with_planted_code_is_refused_before_any_rank_builds(tmp_path):
    hf_dir = save_hf("llama_gqa", tmp_path / "hf")
    commands.hf2mcore(str(hf_dir), str(tmp_path / "mcore"), fmt="torch_dist", quiet=True)
    marker = tmp_path / "ran"
    plant_in_metadata(tmp_path / "mcore" / "release", marker)
    data = [1, write_corpus(tmp_path / "data", "en", 60, 100, seed=5)]
    args = tiny_args(
        tmp_path / "run",
        data,
        f"checkpoint.pretrained_checkpoint={tmp_path / 'mcore'}",
        "checkpoint.use_checkpoint_args=true",
    )
    _refused("pickles posix.system", marker, lambda: plan_run(load_config(None, args), world_size=1))
