"""Model FLOPs per token: one formula for the trainer's MFU and tools.scaling's compute budgets."""

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
