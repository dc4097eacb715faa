"""A DeepSeek-V3-style model through the trainer on 2 gloo ranks (EP=2): Multi-Latent Attention with
query compression, a dense first layer, shared experts, the sigmoid router with group-limited routing,
top-k scaling and auxiliary-loss-free balancing (its expert bias moves with the load)."""

import dataclasses
import math

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.formats.megatron_lm_args import megatron_lm_args, model_config_from_args
from megatron_patches.formats.model_config import ModelConfig
from tests.dist import run_on_ranks
from tests.megatron_patches.training.test_train import losses, tiny_args, two_channels

DEEPSEEK_V3_STYLE = (
    "model.num_layers=2",
    "model.num_query_groups=null",
    "model.norm_epsilon=1e-6",
    "model.multi_latent_attention=true",
    "model.qk_layernorm=true",
    "model.q_lora_rank=24",
    "model.kv_lora_rank=16",
    "model.qk_head_dim=8",
    "model.qk_pos_emb_head_dim=4",
    "model.v_head_dim=6",
    "model.num_moe_experts=4",
    "model.moe_ffn_hidden_size=16",
    "model.moe_shared_expert_intermediate_size=32",
    "model.moe_layer_freq=[0,1]",
    "model.moe_router_topk=2",
    "model.moe_router_num_groups=2",
    "model.moe_router_group_topk=1",
    "model.moe_router_score_function=sigmoid",
    "model.moe_router_enable_expert_bias=true",
    "model.moe_router_bias_update_rate=0.01",
    "model.moe_router_topk_scaling_factor=2.5",
    "model.moe_token_dispatcher_type=alltoall",
    "parallel.expert_model_parallel_size=2",
    "train.train_iters=3",  # odd: the bias moves by +-rate per iteration and cannot be back at 0
    "checkpoint.save_at_end=false",
)


def _train_and_read_expert_bias(args: list[str]) -> tuple[int, list[float]]:
    from megatron_patches.training import builder, run

    built, build = [], builder.build

    def keep_built(cfg):
        built.append(build(cfg))
        return built[-1]

    builder.build = keep_built
    code = run.main(args)
    biases = [b for name, b in built[-1].gpt.named_buffers() if name.endswith("router.expert_bias")]
    return code, [float(v) for v in biases[0]]


def test_deepseek_v3_style_model_trains_and_balances_without_aux_loss(tmp_path):
    args = tiny_args(tmp_path / "run", two_channels(tmp_path), *DEEPSEEK_V3_STYLE)
    results = run_on_ranks(_train_and_read_expert_bias, 2, args, timeout=240)
    assert [code for code, _ in results] == [0, 0]
    curve = losses(tmp_path / "run")
    assert sorted(curve) == [1, 2, 3] and all(math.isfinite(v) for v in curve.values())
    assert curve[3] < curve[1]
    bias = results[0][1]
    assert any(v != 0.0 for v in bias) and bias == results[1][1]  # updated from the load, same on every rank


MLA = ModelConfig(
    multi_latent_attention=True,
    qk_layernorm=True,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_head_dim=8,
    qk_pos_emb_head_dim=4,
    v_head_dim=6,
    rope_type="yarn",
    rotary_scaling_factor=40.0,
    mscale=0.707,
    mscale_all_dim=0.707,
)


def test_mla_survives_megatron_lm_args():
    """A Megatron-LM checkpoint of an MLA model must not read back as a model with standard attention."""
    assert model_config_from_args(megatron_lm_args(MLA, 1, 1), "ckpt") == MLA


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(attention_backend="unfused"), "needs attention_backend sdpa or auto"),
        (dict(use_rope_scaling=True), "needs no use_rope_scaling"),
        (dict(rope_type="longrope"), "rope_type must be one of"),
        (dict(qk_pos_emb_head_dim=5), "qk_pos_emb_head_dim must be even"),
        (dict(q_lora_rank=0), "q_lora_rank must be positive"),
    ],
)
def test_mla_configs_megatron_core_cannot_build_are_refused_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message) as error:
        dataclasses.replace(MLA, **change).validate()
    assert "\n" not in str(error.value)
