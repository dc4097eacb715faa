"""Model FLOPs per token: one formula for the trainer's MFU and tools.scaling's compute budgets."""

import dataclasses

import pytest

from megatron_patches.flops import flops_per_iteration, model_flops_per_token
from megatron_patches.formats.model_config import ModelConfig

LLAMA2_7B = ModelConfig(
    num_layers=32,
    hidden_size=4096,
    ffn_hidden_size=11008,
    num_attention_heads=32,
    vocab_size=32000,
)


def test_llama2_7b_costs_6n_plus_the_attention_term_per_token():
    h, layers, seq = 4096, 32, 4096
    matmul_params = layers * (4 * h * h + 3 * h * 11008) + h * 32000  # layers and output layer
    expected = 6 * matmul_params + 12 * layers * seq * h  # Kaplan et al.'s C = 6N + 12 L s h
    assert model_flops_per_token(LLAMA2_7B, seq) == expected
    assert expected == pytest.approx(46.08e9, rel=1e-3)


def test_the_trainer_counts_the_same_flops_per_iteration():
    from megatron_patches.training.metrics import flops_per_iteration as trainer_flops

    assert trainer_flops(LLAMA2_7B, 4096, 1024) == flops_per_iteration(LLAMA2_7B, 4096, 1024)
    assert flops_per_iteration(LLAMA2_7B, 4096, 1024) == model_flops_per_token(LLAMA2_7B, 4096) * 4096 * 1024


def test_moe_counts_the_routed_and_shared_experts_a_token_passes_and_dense_layers_their_ffn():
    mixtral = ModelConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=32000,
        num_moe_experts=8,
        moe_router_topk=2,
    )
    h, layers, seq = 4096, 32, 4096
    attention = 2 * h * h + 2 * h * 8 * 128  # q and output, k and v with 8 groups of 128
    active = layers * (attention + 2 * 3 * h * 14336) + h * 32000  # 2 of 8 experts per token
    assert model_flops_per_token(mixtral, seq) == 6 * active + 12 * layers * seq * h
    assert active == pytest.approx(12.7e9, rel=1e-2)  # Mixtral-8x7B's ~13B active parameters
    # first-k-dense with shared experts: the dense layer costs a dense model's layer, each MoE layer
    # a dense layer of width top-k x moe_ffn + shared
    small = dict(num_layers=3, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4, vocab_size=100)
    moe = ModelConfig(
        **small,
        num_moe_experts=6,
        moe_router_topk=3,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=64,
        moe_layer_freq=[0, 1, 1],
    )
    dense, as_moe = ModelConfig(**small), ModelConfig(**{**small, "ffn_hidden_size": 3 * 32 + 64})
    # the mean of 1 dense model and 2 all-"MoE-width" models: 1/3 of each kind of layer, one output layer
    expected = (model_flops_per_token(dense, 128) + 2 * model_flops_per_token(as_moe, 128)) / 3
    assert model_flops_per_token(moe, 128) == pytest.approx(expected, rel=1e-12)


def test_multi_latent_attention_counts_its_latent_projections_and_head_widths():
    # DeepSeek-V3: 61 layers (3 dense), MLA with query and key/value latents, 256 experts top-8 + 1 shared
    v3 = ModelConfig(
        num_layers=61,
        hidden_size=7168,
        ffn_hidden_size=18432,
        num_attention_heads=128,
        vocab_size=129280,
        multi_latent_attention=True,
        qk_layernorm=True,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_head_dim=128,
        qk_pos_emb_head_dim=64,
        v_head_dim=128,
        num_moe_experts=256,
        moe_router_topk=8,
        moe_ffn_hidden_size=2048,
        moe_shared_expert_intermediate_size=2048,
        moe_layer_freq=[0] * 3 + [1] * 58,
    )
    h, heads, seq = 7168, 128, 4096
    q_down, q_up, q_norm = h * 1536, 1536 * heads * 192, 1536
    kv_down, kv_up, kv_norm = h * (512 + 64), 512 * heads * (128 + 128), 512
    attention = q_down + q_up + q_norm + kv_down + kv_up + kv_norm + heads * 128 * h
    mlp = 3 * [3 * h * 18432] + 58 * [3 * h * 2048 * (8 + 1)]
    active = 61 * attention + sum(mlp) + h * 129280
    assert active + h * 129280 == pytest.approx(37.5e9, rel=1e-2)  # "37B activated", with the embedding
    scores = 2 * seq * heads * (192 + 128)  # QK^T over 192-wide heads, AV over 128-wide values
    assert model_flops_per_token(v3, seq) == 6 * active + 3 * 61 * scores
    # without a query latent (DeepSeek-V2-Lite) the query is one projection to the heads
    lite = dataclasses.replace(v3, q_lora_rank=None)
    no_latent = h * heads * 192 - (q_down + q_up + q_norm)
    assert model_flops_per_token(lite, seq) == model_flops_per_token(v3, seq) + 6 * 61 * no_latent
