"""Megatron-Core trains and computes the same function on gloo ranks at any layout."""

from dataclasses import replace

import pytest
import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig
from megatron_patches.parallel import Layout, validate_layout
from tests.dist import RankFailure, run_on_ranks

TINY = ModelConfig(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=100,
    max_position_embeddings=64,
)
# Multi-Latent Attention at an odd latent width: 15 + 6 = 21 channels of the local spec's kv down projection.
MLA = replace(
    TINY,
    multi_latent_attention=True,
    qk_layernorm=True,
    kv_lora_rank=15,
    qk_pos_emb_head_dim=6,
    qk_head_dim=10,
)
SEQ = 16


def _fixed_batch(seed: int, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (batch, SEQ + 1), generator=gen)


def _train_steps(tp: int, pp: int, steps: int) -> list[float]:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patches import parallel
    from megatron_patches.training.model import build_model_for_this_rank

    world = torch.distributed.get_world_size()
    parallel.initialize(Layout(world, tp, pp), seed=1234, model=TINY)
    model = build_model_for_this_rank(TINY)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(use_distributed_optimizer=True), model
    )
    model.config.finalize_model_grads_func = finalize_model_grads  # DP grad reduction, as Megatron-LM
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, use_distributed_optimizer=True, clip_grad=1.0), [ddp]
    )
    # The same 4 micro-batches every step: the loss must fall as the model fits them.
    micro_batches = [_fixed_batch(100 * ps.get_data_parallel_rank() + i) for i in range(4)]

    def forward_step(batches, model):
        tokens = next(batches)
        positions = torch.arange(SEQ).expand(tokens.shape[0], -1)
        token_losses = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
        return token_losses, lambda out: (out.float().mean(), {"lm loss": out.float().mean().detach()})

    losses = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=ddp,
            num_microbatches=len(micro_batches),
            seq_length=SEQ,
            micro_batch_size=2,
        )
        update_ok, grad_norm, _ = optimizer.step()
        assert update_ok and grad_norm is not None and grad_norm > 0
        if ps.is_pipeline_last_stage():
            losses.append(torch.stack([r["lm loss"] for r in reports]).mean().item())
    # Data-parallel replicas saw different data but must hold identical weights.
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    replicas = [torch.empty_like(flat) for _ in range(ps.get_data_parallel_world_size())]
    torch.distributed.all_gather(replicas, flat, group=ps.get_data_parallel_group())
    assert all(torch.equal(replicas[0], r) for r in replicas), "DP replicas diverged"
    return losses


@pytest.mark.slow
def test_dp2_tp2_pp2_distributed_optimizer_loss_decreases():
    per_rank = run_on_ranks(_train_steps, 8, 2, 2, 6)
    last_stage = [losses for losses in per_rank if losses]
    assert len(last_stage) == 4  # TP 2 x DP 2 ranks hold the last pipeline stage
    for losses in last_stage:
        assert losses[-1] < losses[0] - 0.05, losses


def _logits_at(tp: int, load_from: str | None, save_to: str | None) -> torch.Tensor:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_patches import parallel
    from megatron_patches.training.model import build_model_for_this_rank

    parallel.initialize(Layout(torch.distributed.get_world_size(), tp, 1), seed=7 + tp, model=TINY)
    model = build_model_for_this_rank(TINY)
    if load_from:
        loaded = dist_checkpointing.load(model.sharded_state_dict(), load_from)
        model.load_state_dict(loaded)
    if save_to:
        dist_checkpointing.save(model.sharded_state_dict(), save_to)
    model.eval()
    tokens = _fixed_batch(0)[:, :-1]
    with torch.no_grad():
        logits = model(tokens, torch.arange(SEQ).expand(2, -1), None)
    logits = gather_from_tensor_model_parallel_region(logits)[..., : TINY.vocab_size]
    parallel_state.destroy_model_parallel()
    return logits


def _tp1_then_tp2(ckpt_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    reference = _logits_at(1, None, ckpt_dir)
    resharded = _logits_at(2, ckpt_dir, None)
    return reference, resharded


def test_tp2_logits_equal_tp1_for_the_same_weights(tmp_path):
    # Megatron-Core's own resharding (torch_dist) moves the TP=1 weights to TP=2,
    # exercising the GQA-grouped QKV and the per-rank gate/up split of SwiGLU.
    (tmp_path / "ckpt").mkdir()
    for reference, resharded in run_on_ranks(_tp1_then_tp2, 2, str(tmp_path / "ckpt")):
        assert reference.shape == resharded.shape == (2, SEQ, TINY.vocab_size)
        torch.testing.assert_close(resharded, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("layout", "model", "message"),
    [
        (Layout(8, 3, 1), None, "world size 8 is not divisible by TP x PP = 3 x 1 = 3"),
        (Layout(8, 2, 3), None, "world size 8 is not divisible by TP x PP = 2 x 3 = 6"),
        (Layout(8, 8, 1), TINY, "num_attention_heads (4) is not divisible by TP (8)"),
        (Layout(4, 4, 1), TINY, "num_query_groups (2) is not divisible by TP (4)"),
        (Layout(6, 1, 3), TINY, "num_layers (4) is not divisible by PP (3)"),
        (Layout(2, 2, 1), MLA, "kv_lora_rank + qk_pos_emb_head_dim (21) is not divisible by TP (2)"),
        (
            Layout(2, 2, 1),
            replace(MLA, kv_lora_rank=14, q_lora_rank=9),
            "q_lora_rank (9) is not divisible by TP (2)",
        ),
    ],
)
def test_impossible_layouts_name_the_numbers(layout, model, message):
    with pytest.raises(ConfigError) as err:
        validate_layout(layout, model)
    assert str(err.value) == message


def _initialize_bad_layout() -> None:
    from megatron_patches import parallel

    parallel.initialize(Layout(2, 2, 1), seed=0, model=ModelConfig(num_attention_heads=3, hidden_size=48))


def test_bad_layout_stops_every_rank_before_megatron_runs():
    with pytest.raises(RankFailure) as err:
        run_on_ranks(_initialize_bad_layout, 2, timeout=120)
    assert "ConfigError: num_attention_heads (3) is not divisible by TP (2)" in str(err.value)
    assert "megatron/core" not in str(err.value)
