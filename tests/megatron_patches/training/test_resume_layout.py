"""Resume at another layout: a TP2 x PP1 x DP2 checkpoint continues at TP1 x PP2 x DP2 and at DP1.

The distributed optimizer's state is saved ``fully_reshardable`` (training/optimizer_sharding.py),
so the resumed losses continue the uninterrupted run's (dropout off: the RNG streams of another
layout legitimately differ). The data position is global, so every resume reads the same samples.
"""

import pytest

from megatron_patches.training import optimizer_sharding
from megatron_patches.training.config import load_config
from megatron_patches.training.validate import plan_run
from tests.dist import run_on_ranks
from tests.megatron_patches.training.corpus import write_corpus
from tests.megatron_patches.training.test_train import _train, losses, tiny_args

SAVED_AT = 3
ITERS = 5  # the checkpoint at SAVED_AT is the only one written
COMMON = (
    "model.hidden_dropout=0",
    "model.attention_dropout=0",
    f"train.train_iters={ITERS}",
    "checkpoint.dist_ckpt_optim_fully_reshardable=true",
)
TP1_PP2 = ("parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2")
TP2 = ("parallel.tensor_model_parallel_size=2",)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The TP2 x PP1 x DP2 run (4 ranks), checkpointed at iteration SAVED_AT; its data and run dir."""
    root = tmp_path_factory.mktemp("relayout")
    data = [1, write_corpus(root / "data", "zh", 40, 128, seed=1)]
    args = tiny_args(root / "full", data, *COMMON, *TP2, f"checkpoint.save_interval={SAVED_AT}")
    assert run_on_ranks(_train, 4, [*args, "checkpoint.save_at_end=false"], timeout=300) == [0] * 4
    return root, data


def _resume_args(root, data, name: str, *layout: str) -> list[str]:
    return tiny_args(
        root / name,
        data,
        *COMMON,
        *layout,
        f"checkpoint.load={root / 'full' / 'checkpoints'}",
        f"checkpoint.load_iteration={SAVED_AT}",
        "checkpoint.save_at_end=false",
    )


def _assert_continues(root, name: str) -> None:
    expected, got = losses(root / "full"), losses(root / name)
    assert sorted(got) == list(range(SAVED_AT + 1, ITERS + 1))
    for it in got:
        assert got[it] == pytest.approx(expected[it], rel=1e-5, abs=0), (it, got, expected)


def test_tp2_checkpoint_resumes_at_tp1_pp2_with_the_uninterrupted_losses(uninterrupted):
    root, data = uninterrupted
    args = _resume_args(root, data, "tp1_pp2", *TP1_PP2)
    notes = plan_run(load_config(None, args), world_size=4).notes
    assert any("resuming a TP2×PP1×DP2 checkpoint at TP1×PP2×DP2" in line for line in notes), notes
    assert run_on_ranks(_train, 4, args, timeout=300) == [0] * 4
    _assert_continues(root, "tp1_pp2")


def test_tp2_dp2_checkpoint_resumes_at_dp1_with_the_uninterrupted_losses(uninterrupted):
    root, data = uninterrupted
    assert run_on_ranks(_train, 2, _resume_args(root, data, "dp1", *TP2), timeout=300) == [0, 0]
    _assert_continues(root, "dp1")


@pytest.mark.parametrize(
    ("common", "expected"),
    [
        ({"content_metadata": {"distrib_optim_sharding_type": "fully_reshardable"}}, "fully_reshardable"),
        # written before content_metadata was recorded: what the optimizer's common entries say
        ({"optimizer": {"param_state_sharding_type": "dp_reshardable", "optimizer": {}}}, "dp_reshardable"),
        ({"optimizer": {0: {"param_state_sharding_type": "fully_reshardable"}}}, "fully_reshardable"),
        ({}, "dp_reshardable"),
    ],
    ids=["recorded", "older", "chained-optimizer", "unrecorded"],
)
def test_a_resume_loads_the_optimizer_format_the_checkpoint_was_saved_in(common, expected):
    assert optimizer_sharding.saved_metadata(common) == {"distrib_optim_sharding_type": expected}
