"""Mixture-of-Experts through the trainer on gloo ranks: Megatron-Core's MoE layers at EP=2 (and
TP=2 x EP=2 with sequence parallel), with one expert that never receives a token (the
unused-expert freeze: no hang, its gradient exactly zero), both token dispatchers, exact resume,
the auxiliary losses logged apart from ``lm loss``, and one-line errors for bad MoE configs."""

import dataclasses
import json
import math

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.formats.megatron_lm_args import (
    megatron_lm_args,
    model_config_from_args,
    read_model_config_file,
)
from megatron_patches.formats.model_config import ModelConfig
from megatron_patches.training.config import load_config
from megatron_patches.training.validate import plan_run
from tests.dist import run_on_ranks
from tests.megatron_patches.probe import tensorboard_scalars
from tests.megatron_patches.training.test_train import losses, tiny_args, two_channels

UNUSED_EXPERT = 3  # global index: local expert 1 of EP rank 1
MOE = (
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.ffn_hidden_size=32",
    "model.num_moe_experts=4",
    "model.moe_ffn_hidden_size=16",
    "model.moe_router_topk=2",
    "model.moe_aux_loss_coeff=0.01",
    "model.moe_z_loss_coeff=0.001",
    "parallel.expert_model_parallel_size=2",
    "checkpoint.save_interval=100",
    "logging.log_interval=2",
)
# Channel loss, the spike guard and two RoPE stages (seq 32, then 64 with another base) on the MoE model.
PATCHES = (
    "patches.channel_loss=true",
    "patches.loss_spike={warmup: 3}",
    "patches.rope_schedule={stages: [{until_tokens: 768, seq_length: 32, rotary_base: 10000},"
    " {seq_length: 64, rotary_base: 1000000}]}",
)
ALLTOALL = "model.moe_token_dispatcher_type=alltoall"
ALLGATHER = "model.moe_token_dispatcher_type=allgather"


def _train_without_one_expert(args: list[str]) -> tuple[int, dict[str, float]]:
    """Train with the router never choosing ``UNUSED_EXPERT``; return the exit code and, per local
    expert weight, the largest |main_grad| of the last iteration (None: no main_grad)."""
    import torch
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_patches.training import builder, run

    built, build, gating = [], builder.build, TopKRouter.gating

    def keep_built(cfg):
        built.append(build(cfg))
        return built[-1]

    def never_the_unused_expert(self, input):
        logits = gating(self, input)
        excluded = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        excluded[UNUSED_EXPERT] = -1e4  # its softmax probability is 0: never in the top-k
        return logits + excluded

    builder.build, TopKRouter.gating = keep_built, never_the_unused_expert
    code = run.main(args)
    grads = {
        name: None if getattr(param, "main_grad", None) is None else float(param.main_grad.abs().max())
        for name, param in built[-1].gpt.named_parameters()
        if "local_experts" in name
    }
    return code, grads


def _grad_norms(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["grad_norm"] for r in map(json.loads, lines)]


def _check_unused_expert(results: list, ep_rank_of: list[int]) -> None:
    """Exit 0 on every rank; the unused expert's gradient is exactly 0 (present), the others' not."""
    assert [code for code, _ in results] == [0] * len(results)
    for (_, grads), ep_rank in zip(results, ep_rank_of, strict=True):
        assert grads and all(value is not None for value in grads.values())
        for name, value in grads.items():
            local = int(name.split("local_experts.")[1].split(".")[0])
            unused = ep_rank * 2 + local == UNUSED_EXPERT
            assert (value == 0.0) == unused, (name, ep_rank, value)


def _run(run_dir, data, world: int, *extra: str) -> list:
    args = tiny_args(run_dir, data, *MOE, *extra)
    return run_on_ranks(_train_without_one_expert, world, args, timeout=300)


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    """EP=2 on 2 ranks (DP=2, expert-DP=1), 6 iterations: alltoall, allgather, and alltoall stopped
    after 3 and resumed; the unused expert in all of them."""
    root = tmp_path_factory.mktemp("moe")
    data = two_channels(root)
    common = ("train.train_iters=6", *PATCHES)
    once = "checkpoint.save_at_end=false"  # the resumed run proves saving and loading
    runs = {
        "alltoall": _run(root / "alltoall", data, 2, *common, ALLTOALL, once),
        "allgather": _run(root / "allgather", data, 2, *common, ALLGATHER, once),
    }
    broken = _run(root / "resumed", data, 2, *common, ALLTOALL, "train.exit_interval=3")
    assert [code for code, _ in broken] == [0, 0] and max(losses(root / "resumed")) == 3
    runs["resumed"] = _run(root / "resumed", data, 2, *common, ALLTOALL)
    runs["args"] = tiny_args(root / "resumed", data, *MOE, *common, ALLTOALL)
    return root, runs


def test_an_expert_without_tokens_trains_with_zero_gradient_under_both_dispatchers(ep2):
    root, runs = ep2
    for name in ("alltoall", "allgather", "resumed"):
        _check_unused_expert(runs[name], ep_rank_of=[0, 1])
    norms = _grad_norms(root / "alltoall")
    assert len(norms) == 6 and all(math.isfinite(n) for n in norms)  # clipped (clip_grad 1.0), applied
    assert (root / "resumed" / "checkpoints" / "iter_0000006").is_dir()  # saved after loading iteration 3


def test_alltoall_and_allgather_dispatchers_give_equal_losses(ep2):
    root, _ = ep2
    alltoall, allgather = losses(root / "alltoall"), losses(root / "allgather")
    assert sorted(alltoall) == list(range(1, 7))
    assert allgather == pytest.approx(alltoall, rel=1e-5, abs=0)


def test_moe_resumes_exactly_and_logs_aux_losses_apart_from_lm_loss(ep2):
    root, _ = ep2
    full, resumed = losses(root / "alltoall"), losses(root / "resumed")
    assert [resumed[i] for i in range(4, 7)] == [full[i] for i in range(4, 7)]
    for tag in ("moe/aux_loss", "moe/z_loss", "lm loss", "channel_loss/zh", "channel_loss/en"):
        logged = tensorboard_scalars(root / "alltoall", tag)
        assert sorted(logged) == [2, 4, 6] and all(math.isfinite(v) and v > 0 for v in logged.values())
        assert tensorboard_scalars(root / "resumed", tag)[6] == logged[6]  # the window 5..6 in both
    aux, lm = (
        tensorboard_scalars(root / "alltoall", "moe/aux_loss"),
        tensorboard_scalars(root / "alltoall", "lm loss"),
    )
    # lm loss is the token losses' mean: the iteration log's losses of the window, not plus the aux loss
    assert lm[2] == pytest.approx((full[1] + full[2]) / 2, rel=1e-6)
    assert 0.5 < aux[2] < 4.0  # Switch load-balancing loss: ~1 when balanced, num_experts at collapse


def test_a_resume_at_another_expert_parallel_size_is_refused_in_one_line(ep2):
    _, runs = ep2
    cfg = load_config(None, [*runs["args"], "train.train_iters=8", "parallel.expert_model_parallel_size=1"])
    with pytest.raises(
        ConfigError, match="parallel.expert_model_parallel_size: checkpoint 2, this run 1"
    ) as error:
        plan_run(cfg, 2)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_tp2_ep2_with_sequence_parallel_trains_with_an_expert_without_tokens(tmp_path):
    data = two_channels(tmp_path)
    extra = (
        "train.train_iters=3",
        "parallel.tensor_model_parallel_size=2",
        "parallel.expert_tensor_parallel_size=1",
        ALLTOALL,
    )
    results = _run(tmp_path / "run", data, 4, *extra)
    # rank = tp + 2 * dp (Megatron-Core's tp-cp-ep-dp-pp order); EP runs over ranks 0,1 | 2,3 (ETP=1)
    _check_unused_expert(results, ep_rank_of=[0, 1, 0, 1])
    assert len(losses(tmp_path / "run")) == 3
    assert (tmp_path / "run" / "checkpoints" / "iter_0000003").is_dir()


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (
            ("parallel.expert_model_parallel_size=3",),
            3,
            r"num_moe_experts \(4\) is not divisible by expert_model",
        ),
        (
            ("model.moe_router_topk=5",),
            2,
            r"moe_router_topk \(5\) must be between 1 and model.num_moe_experts",
        ),
        (("model.moe_layer_freq=[1,0,1]",), 2, r"one 0 \(dense\) or 1 \(MoE\) per layer \(2\)"),
        (("model.moe_grouped_gemm=true",), 2, "moe_grouped_gemm=true needs a GPU"),
        (("model.moe_router_enable_expert_bias=true",), 2, "needs model.moe_router_score_function=sigmoid"),
        (("parallel.expert_tensor_parallel_size=2",), 2, r"ETP x EP x PP|expert_tensor_parallel_size x"),
        (
            ("parallel.tensor_model_parallel_size=2", ALLTOALL),
            4,
            "alltoall with expert_tensor_parallel_size 2",
        ),
        (
            ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=false"),
            4,
            "needs parallel.sequence_parallel=true",
        ),
        (("model.num_moe_experts=null", "model.moe_ffn_hidden_size=null"), 2, "need model.num_moe_experts"),
    ],
    ids=[
        "ep",
        "topk",
        "layer-freq",
        "grouped-gemm",
        "expert-bias",
        "etp-grid",
        "etp-alltoall",
        "sp",
        "dense-ep",
    ],
)
def test_bad_moe_configs_are_refused_in_one_line(tmp_path, extra, world, message):
    cfg = load_config(None, tiny_args(tmp_path, [1, str(tmp_path / "x")], "data.mock=true", *MOE, *extra))
    with pytest.raises(ConfigError, match=message) as error:
        plan_run(cfg, world)
    assert "\n" not in str(error.value)


def test_megatron_lm_args_carry_the_moe_architecture_both_ways(tmp_path):
    moe = ModelConfig(
        num_moe_experts=6,
        moe_router_topk=3,
        moe_ffn_hidden_size=48,
        moe_shared_expert_intermediate_size=96,
        moe_layer_freq=[0, 1],
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_token_dispatcher_type="alltoall",
    )
    args = megatron_lm_args(moe, 1, 1)
    assert (args.num_experts, args.moe_router_topk, args.moe_layer_freq) == (6, 3, [0, 1])
    assert model_config_from_args(args, "ckpt") == dataclasses.replace(moe, transformer_impl="local")
    assert model_config_from_args(megatron_lm_args(ModelConfig(), 1, 1), "ckpt").num_moe_experts is None
    listing = tmp_path / "args.txt"
    listing.write_text(
        "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --padded-vocab-size 256 "
        "--num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 32 --moe-grouped-gemm\n"
    )
    read = read_model_config_file(listing)
    assert (read.num_moe_experts, read.moe_router_topk, read.moe_ffn_hidden_size) == (8, 2, 32)
    assert read.moe_grouped_gemm
