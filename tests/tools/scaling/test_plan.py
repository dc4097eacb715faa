"""``plan``: grid shapes Megatron-Core can build, the trainer's FLOPs, budgets turned into iterations."""

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.flops import model_flops_per_token
from megatron_patches.formats.model_config import ModelConfig
from tools.scaling.plan import GridSpec, non_embedding_params, plan_grid, shape_for_width

BASE = {
    "model": {
        "num_layers": 4,
        "hidden_size": 128,
        "ffn_hidden_size": 352,
        "num_attention_heads": 8,
        "num_query_groups": 4,
        "vocab_size": 2000,
    },
    "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
    "data": {"seq_length": 64},
    "train": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": 100},
    "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 10},
    "logging": {"log_interval": 10, "eval_interval": 50},
}


@pytest.mark.parametrize("width", [32, 64, 96, 128, 256, 512, 1024])
def test_every_shape_keeps_the_divisibility_megatron_needs(width):
    s = shape_for_width(BASE["model"], width, tp=2, pp=2)
    assert s.hidden_size == s.num_attention_heads * s.head_dim == width
    assert s.head_dim == 16  # the base's head dimension
    assert s.num_attention_heads % s.num_query_groups == 0
    assert s.num_attention_heads % 2 == 0 and s.num_query_groups % 2 == 0  # TP 2
    assert s.num_layers % 2 == 0 and s.num_layers >= 2  # PP 2
    assert s.ffn_hidden_size % 16 == 0 and s.ffn_hidden_size >= width


def test_depth_grows_with_width_at_the_base_aspect_ratio():
    assert [shape_for_width(BASE["model"], w).num_layers for w in (64, 128, 256, 512)] == [2, 4, 8, 16]


def test_widths_that_break_a_rule_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="not a multiple of the base head dimension 16"):
        shape_for_width(BASE["model"], 72)
    with pytest.raises(ConfigError, match="heads are not divisible by TP 4"):
        shape_for_width(BASE["model"], 16, tp=4)
    with pytest.raises(ConfigError, match="either token budgets"):
        plan_grid(BASE, GridSpec(widths=[64], tokens=[1e5], flops=[1e12]))
    with pytest.raises(ConfigError, match="round to the same iterations"):
        plan_grid(BASE, GridSpec(widths=[64], tokens=[51200, 51300]))  # both 100 iterations


def test_points_carry_the_trainers_flops_and_their_token_budgets():
    points = plan_grid(BASE, GridSpec(widths=[64, 128], tokens=[5e4, 1e5]))
    assert len(points) == 4
    for p in points:
        s = p.shape
        cfg = ModelConfig(
            num_layers=s.num_layers,
            hidden_size=s.hidden_size,
            ffn_hidden_size=s.ffn_hidden_size,
            num_attention_heads=s.num_attention_heads,
            num_query_groups=s.num_query_groups,
            vocab_size=2000,
        )
        assert p.flops_per_token == model_flops_per_token(cfg, 64)  # what the trainer's MFU counts
        assert p.tokens == p.train_iters * 8 * 64
        assert p.flops_6nd == 6 * p.params * p.tokens
        assert f"train.train_iters={p.train_iters}" in p.overrides


def test_non_embedding_parameters_match_a_real_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    s = shape_for_width(BASE["model"], 64)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=s.hidden_size,
            intermediate_size=s.ffn_hidden_size,
            num_hidden_layers=s.num_layers,
            num_attention_heads=s.num_attention_heads,
            num_key_value_heads=s.num_query_groups,
            tie_word_embeddings=False,
        )
    )
    embedding = 2 * 128 * s.hidden_size  # input embedding and output layer
    assert non_embedding_params(s) == sum(p.numel() for p in model.parameters()) - embedding


def test_isoflop_grid_spends_each_budget_and_drops_runs_too_short_to_train():
    budgets = [2e11, 4e11]
    points = plan_grid(BASE, GridSpec(widths=[64, 128, 256], flops=budgets, min_iters=20))
    for p in points:
        budget = min(budgets, key=lambda b: abs(b - p.flops))
        assert p.flops == pytest.approx(budget, rel=0.1)  # whole iterations round the budget
        assert p.train_iters >= 20
    assert len(points) < 6  # the widest model gets too few iterations at the smaller budget


def test_schedules_scale_with_the_run_and_learning_rates_with_the_grid():
    (point,) = plan_grid(BASE, GridSpec(widths=[64], tokens=[64 * 8 * 200], lrs=[1e-3]))
    assert point.train_iters == 200
    overrides = dict(item.split("=", 1) for item in point.overrides)
    assert overrides["optimizer.lr_warmup_iters"] == "20"  # 10% of the base, 10% here
    assert float(overrides["optimizer.min_lr"]) == pytest.approx(1e-4)  # base min/max ratio kept
