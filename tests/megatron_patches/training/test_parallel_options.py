"""Sequence parallel, activation recompute, overlapped DDP communication and read-ahead: each one
changes no loss (against the same run without it, dropout on where the feature must not touch a
random stream) and resumes exactly; what Megatron-Core cannot run is refused in one line."""

import pytest
import torch

from megatron_patches.errors import ConfigError
from megatron_patches.training.config import load_config
from megatron_patches.training.validate import plan_run
from tests.dist import run_on_ranks
from tests.megatron_patches.probe import tensorboard_scalars
from tests.megatron_patches.training.corpus import write_corpus
from tests.megatron_patches.training.test_train import _train, losses, tiny_args, two_channels

TP2 = "parallel.tensor_model_parallel_size=2"
DROPOUT = ("model.hidden_dropout=0.1", "model.attention_dropout=0.1")
OVERLAP = ("ddp.overlap_grad_reduce=true", "ddp.overlap_param_gather=true")
RECOMPUTE_FULL = (
    "model.recompute_granularity=full",
    "model.recompute_method=uniform",
    "model.recompute_num_layers=1",
)


def _run(run_dir, data, world: int, *extra: str) -> dict[int, float]:
    args = tiny_args(run_dir, data, "train.train_iters=10", "checkpoint.save_interval=100", *extra)
    assert run_on_ranks(_train, world, args, timeout=600) == [0] * world
    return losses(run_dir)


def _resumed(run_dir, data, world: int, *extra: str) -> dict[int, float]:
    """Stopped after iteration 4 (saved), then resumed to 10: the losses the run logged."""
    _run(run_dir, data, world, *extra, "train.exit_interval=4")
    assert max(losses(run_dir)) == 4
    return _run(run_dir, data, world, *extra)


@pytest.mark.slow
def test_sequence_parallel_and_overlap_at_tp2_dp2_change_no_loss_and_resume_exactly(tmp_path):
    data = two_channels(tmp_path)
    # dropout off: under SP each TP rank draws the masks of its own part of the sequence
    common = (TP2, f"data.channels={{chinese: {data[1]}}}", "patches.channel_loss=true")
    features = ("parallel.sequence_parallel=true", *OVERLAP, "data.num_workers=2")
    plain = _run(tmp_path / "plain", data, 4, *common)
    with_features = _run(tmp_path / "features", data, 4, *common, *features)
    assert sorted(plain) == list(range(1, 11))
    # Identical for 6 iterations; then ~5e-8 apart: under SP each TP rank sums the norm weights'
    # gradient over its half of the sequence and the halves are all-reduced (another float order).
    assert with_features == pytest.approx(plain, rel=1e-6, abs=0)
    assert [with_features[i] for i in range(1, 7)] == [plain[i] for i in range(1, 7)]
    for channel in ("chinese", "en"):  # per-token losses of the last stage, gathered under SP
        tag = f"channel_loss/{channel}"
        expected = tensorboard_scalars(tmp_path / "plain", tag)
        assert tensorboard_scalars(tmp_path / "features", tag) == pytest.approx(expected, rel=1e-6, abs=0)
    resumed = _resumed(tmp_path / "resumed", data, 4, *common, *features)
    assert [resumed[i] for i in range(5, 11)] == [with_features[i] for i in range(5, 11)]


@pytest.mark.slow
def test_recompute_full_and_selective_with_dropout_change_no_loss_and_resume_exactly(tmp_path):
    data = two_channels(tmp_path)
    plain = _run(tmp_path / "plain", data, 2, *DROPOUT)  # DP = 2
    full = _run(tmp_path / "full", data, 2, *DROPOUT, *RECOMPUTE_FULL, *OVERLAP)
    selective = _run(tmp_path / "selective", data, 2, *DROPOUT, "model.recompute_granularity=selective")
    assert sorted(plain) == list(range(1, 11))
    assert full == plain
    assert selective == plain
    # Smaller buckets shard the gradients differently: the grad norm sums in another order.
    buckets = _run(tmp_path / "buckets", data, 2, *DROPOUT, *OVERLAP, "ddp.bucket_size=4000")
    assert buckets == pytest.approx(plain, rel=1e-6, abs=0)
    resumed = _resumed(
        tmp_path / "resumed", data, 2, *DROPOUT, *RECOMPUTE_FULL, "model.recompute_method=block"
    )
    assert [resumed[i] for i in range(5, 11)] == [plain[i] for i in range(5, 11)]


def _norm_weights_across_tp(args: list[str]) -> float:
    """Train 3 steps at TP=2 with SP; the largest difference of any norm weight between TP ranks."""
    from megatron.core import parallel_state as ps

    from megatron_patches import parallel
    from megatron_patches.training import builder
    from megatron_patches.training.step import forward_backward, optimizer_step

    cfg = load_config(None, args)
    plan = plan_run(cfg, torch.distributed.get_world_size())
    parallel.initialize(plan.layout, cfg.seed, cfg.model)
    objs = builder.build(cfg)
    generator = torch.Generator().manual_seed(5)  # the same batch on both TP ranks
    for _ in range(3):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=generator)
        batch = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": torch.ones(2, 32),
            "position_ids": torch.arange(32).expand(2, -1),
        }
        objs.model.zero_grad_buffer()
        objs.optimizer.zero_grad()
        forward_backward(objs.model, [batch], 1, 32, 2, [], None)
        assert optimizer_step(objs.optimizer, 1.0, lambda grad_norm: False)[0]
        objs.scheduler.step(increment=1)  # out of the LR warm-up's zero start
    norms = torch.cat([p.detach().flatten() for n, p in objs.gpt.named_parameters() if "layernorm" in n])
    assert not torch.equal(norms, torch.ones_like(norms))  # they trained
    gathered = [torch.empty_like(norms) for _ in range(2)]
    torch.distributed.all_gather(gathered, norms, group=ps.get_tensor_model_parallel_group())
    return float((gathered[0] - gathered[1]).abs().max())


def test_norm_weights_stay_identical_across_tp_ranks_under_sequence_parallel(tmp_path):
    args = tiny_args(tmp_path / "run", two_channels(tmp_path), TP2, "parallel.sequence_parallel=true")
    assert run_on_ranks(_norm_weights_across_tp, 2, args, timeout=300) == [0.0, 0.0]


@pytest.fixture
def args(tmp_path):
    return tiny_args(tmp_path / "run", [1, write_corpus(tmp_path / "data", "zh", 20, 128, seed=1)])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["parallel.sequence_parallel=true"], "sequence_parallel=true needs tensor_model_parallel_size > 1"),
        (
            [TP2, "parallel.sequence_parallel=true", "data.seq_length=33"],
            "seq_length (33) is not divisible by tensor_model_parallel_size (2)",
        ),
        (["parallel.context_parallel_size=2"], "context_parallel_size=2 needs Transformer Engine attention"),
        (["model.recompute_granularity=full"], "needs model.recompute_method in ('uniform', 'block')"),
        (
            ["model.recompute_granularity=partial"],
            "recompute_granularity must be one of ('full', 'selective')",
        ),
        (
            ["model.recompute_granularity=selective", "model.recompute_num_layers=1"],
            "unset model.recompute_method and model.recompute_num_layers",
        ),
        (
            [*RECOMPUTE_FULL[:2], "model.recompute_num_layers=5"],
            "recompute_num_layers (5) exceeds the layers",
        ),
        (["model.recompute_num_layers=1"], "need model.recompute_granularity=full"),
        (["ddp.overlap_param_gather=true"], "overlap_param_gather=true needs ddp.overlap_grad_reduce=true"),
        (["ddp.bucket_size=0"], "ddp.bucket_size must be a positive number"),
        (["ddp.average_in_collective=true"], "ddp.average_in_collective=true cannot be used"),
        (["data.num_workers=-1"], "data.num_workers must be >= 0"),
    ],
)
def test_options_megatron_core_cannot_run_are_refused_in_one_line(args, extra, message):
    world = 2 if TP2 in extra else 1
    with pytest.raises(ConfigError) as err:
        plan_run(load_config(None, [*args, *extra]), world_size=world)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default")
def test_sequence_parallel_is_off_by_default_on_cpu_and_on_when_set(args):
    cfg = load_config(None, [*args, TP2])
    plan_run(cfg, world_size=2)
    assert cfg.parallel.sequence_parallel is False
    cfg = load_config(None, [*args, TP2, "sequence_parallel=true"])
    plan_run(cfg, world_size=2)
    assert cfg.parallel.sequence_parallel is True


@pytest.mark.gpu
def test_on_a_gpu_sequence_parallel_defaults_on_at_tp2_and_context_parallel_needs_te(args):
    cfg = load_config(None, [*args, TP2, "model.transformer_impl=local"])
    plan_run(cfg, world_size=2)
    assert cfg.parallel.sequence_parallel is True
    local_cp = load_config(None, [*args, "model.transformer_impl=local", "parallel.context_parallel_size=2"])
    with pytest.raises(ConfigError, match="needs Transformer Engine attention"):
        plan_run(local_cp, world_size=2)
