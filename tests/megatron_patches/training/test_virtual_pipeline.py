"""Interleaved (virtual) pipeline: PP=2 x VPP=2 on 2 gloo ranks (with overlapped DDP communication,
channel loss, a RoPE stage switch, evaluation) gives the losses of PP=2 without it (both started from
one checkpoint: VPP builds, so initializes, its layers in another order; dropout off), resumes exactly,
and its checkpoints resume without VPP; bad layouts and releases are refused in one line."""

import re
import shutil

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.training.config import load_config
from megatron_patches.training.validate import plan_run
from tests.dist import run_on_ranks
from tests.megatron_patches.probe import tensorboard_scalars
from tests.megatron_patches.training.test_train import _train, losses, tiny_args, two_channels

PP2 = "parallel.pipeline_model_parallel_size=2"
VPP2 = "parallel.virtual_pipeline_model_parallel_size=2"
RESHARDABLE = "checkpoint.dist_ckpt_optim_fully_reshardable=true"  # a VPP checkpoint resumed without VPP
# The VPP runs also overlap grad reduce and param gather: one sync function per model chunk.
VPP2_OVERLAP = (VPP2, "ddp.overlap_grad_reduce=true", "ddp.overlap_param_gather=true")
RECOMPUTE_2 = (
    "model.recompute_granularity=full",
    "model.recompute_method=block",
    "model.recompute_num_layers=2",
)

RUN = (
    "train.train_iters=10",
    "patches.channel_loss=true",
    # after 5 iterations of 256 tokens: seq 64 and another rotary base, in every model chunk
    "patches.rope_schedule={stages: [{until_tokens: 1280, seq_length: 32, rotary_base: 10000},"
    " {seq_length: 64, rotary_base: 1000000}]}",
    "logging.eval_interval=5",
    "logging.eval_iters=1",
)


def _run(run_dir, data, *extra: str) -> dict[int, float]:
    args = tiny_args(run_dir, data, PP2, "checkpoint.save_interval=100", RESHARDABLE, *extra)
    assert run_on_ranks(_train, 2, args, timeout=600) == [0, 0]
    return losses(run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One seed checkpoint (1 step at PP=2); from it 10 steps at PP=2, at PP=2 x VPP=2, and at
    PP=2 x VPP=2 stopped after 4 and resumed (with VPP, and without). Channel loss on, a RoPE stage
    switch after iteration 5, evaluation every 5 iterations."""
    root = tmp_path_factory.mktemp("vpp")
    data = two_channels(root)
    _run(root / "seed", data, "train.train_iters=1", "optimizer.lr_warmup_iters=0")
    common = (f"checkpoint.pretrained_checkpoint={root / 'seed' / 'checkpoints'}", *RUN)
    plain = _run(root / "plain", data, *common)
    vpp = _run(root / "vpp", data, *common, *VPP2_OVERLAP)
    _run(root / "resumed", data, *common, *VPP2_OVERLAP, "train.exit_interval=4")
    assert max(losses(root / "resumed")) == 4
    shutil.copytree(root / "resumed", root / "relayout")
    resumed = _run(root / "resumed", data, *common, *VPP2_OVERLAP)
    relayout = _run(root / "relayout", data, *common)  # the VPP checkpoint resumed without VPP
    return root, plain, vpp, resumed, relayout


@pytest.mark.slow
def test_vpp_gives_the_losses_of_the_same_layers_without_it(runs):
    root, plain, vpp, *_ = runs
    assert sorted(vpp) == list(range(1, 11))
    assert vpp == pytest.approx(plain, rel=1e-6, abs=0)
    for tag in ("channel_loss/en", "lm loss validation"):  # the last chunk's per-token losses; eval
        expected = tensorboard_scalars(root / "plain", tag)
        assert expected
        assert tensorboard_scalars(root / "vpp", tag) == pytest.approx(expected, rel=1e-6, abs=0)


@pytest.mark.slow
def test_vpp_resumes_exactly_and_its_checkpoint_resumes_without_vpp(runs):
    _, plain, vpp, resumed, relayout = runs
    assert [resumed[i] for i in range(5, 11)] == [vpp[i] for i in range(5, 11)]
    # model tensors are keyed by global layer, the optimizer state is fully re-shardable
    assert [relayout[i] for i in range(5, 11)] == pytest.approx([plain[i] for i in range(5, 11)], rel=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        ((VPP2,), "needs pipeline_model_parallel_size >= 2"),
        (
            (PP2, "parallel.virtual_pipeline_model_parallel_size=4"),
            "num_layers (4) is not divisible by PP x VPP",
        ),
        ((PP2, "parallel.num_layers_per_virtual_pipeline_stage=3"), "num_layers_per_virtual_pipeline_stage"),
        ((PP2, VPP2, "train.global_batch_size=6"), "to be a multiple of PP (2)"),
        (
            (PP2, VPP2, *RECOMPUTE_2),
            "exceeds the layers per pipeline stage (num_layers 4 / PP 2 x VPP 2 = 1)",
        ),
    ],
    ids=["pp1", "layers", "layers-per-stage", "micro-batches", "recompute"],
)
def test_bad_virtual_pipeline_layouts_are_refused_in_one_line(tmp_path, extra, message):
    cfg = load_config(None, tiny_args(tmp_path, [1, str(tmp_path / "x")], "data.mock=true", *extra))
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        plan_run(cfg, 2)
    assert "\n" not in str(error.value)


def test_layers_per_virtual_stage_is_the_same_layout(tmp_path):
    args = tiny_args(tmp_path, [1, str(tmp_path / "x")], "data.mock=true", PP2)
    by_size = plan_run(load_config(None, [*args, VPP2]), 2).layout
    by_layers = plan_run(load_config(None, [*args, "parallel.num_layers_per_virtual_pipeline_stage=1"]), 2)
    assert by_size.virtual_pipeline_model_parallel_size == 2
    assert by_layers.layout == by_size


@pytest.mark.slow
def test_a_resume_at_another_vpp_needs_fully_reshardable_optimizer_state(runs, monkeypatch):
    from megatron_patches.training import optimizer_sharding

    root = runs[0]
    data = two_channels(root)
    args = tiny_args(root / "again", data, PP2, *RUN, f"checkpoint.load={root / 'vpp' / 'checkpoints'}")
    plan = plan_run(load_config(None, args), 2)
    assert "resume: model chunks per PP rank 2 -> 1 (fully_reshardable optimizer)" in plan.notes
    dp_only = optimizer_sharding.metadata(fully_reshardable=False)
    monkeypatch.setattr(optimizer_sharding, "common_state_sharding", lambda path: dp_only)
    with pytest.raises(ConfigError, match="loads at the same VPP only") as refused:
        plan_run(load_config(None, args), 2)
    assert "\n" not in str(refused.value)


def test_a_legacy_release_must_hold_the_runs_model_chunks(tmp_path):
    from megatron_patches.formats import checkpoint as ckpt_format
    from megatron_patches.training import checkpoint
    from tests.tools.convert import tiny
    from tools.convert import commands

    hf_dir = tiny.save_hf("llama_gqa", tmp_path / "hf", seed=1)  # 4 layers
    for name, vpp in (("plain", None), ("vpp", 2)):
        commands.hf2mcore(hf_dir, tmp_path / name, tp=1, pp=2, vpp=vpp, quiet=True)
    vpp_release = ckpt_format.iteration_dir(tmp_path / "vpp")
    checkpoint.check_pretrained_layout(vpp_release, 1, 2, 4, vpp=2)
    with pytest.raises(ConfigError) as refused:
        checkpoint.check_pretrained_layout(ckpt_format.iteration_dir(tmp_path / "plain"), 1, 2, 4, vpp=2)
    message = str(refused.value)
    assert "converted for TP=1 PP=2 but this run is TP=1 PP=2 VPP=2" in message and "\n" not in message
    assert "mcore2mcore --tp 1 --pp 2 --vpp 2" in message
    with pytest.raises(ConfigError, match="converted for TP=1 PP=2 VPP=2 but this run is TP=1 PP=2;"):
        checkpoint.check_pretrained_layout(vpp_release, 1, 2, 4)
