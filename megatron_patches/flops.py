"""Model FLOPs per token and per iteration (Megatron-LM's accounting), from plain numbers.

The trainer's MFU estimate and ``tools/scaling`` (compute budgets of a grid)
count the same FLOPs, so the formula lives here, below both.
Per token and layer: QKV and output projections with GQA, attention scores
and values (causal mask not discounted, as Megatron-LM), and the MLP (3
matrices with SwiGLU); plus the output layer. Backward costs twice forward.
No activation recompute is counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_patches.formats.model_config import ModelConfig


def training_flops_per_token(
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    head_dim: int,
    padded_vocab_size: int,
    seq_length: int,
    swiglu: bool = True,
) -> float:
    """Forward + backward FLOPs of one token of a ``seq_length`` sequence."""
    h, s = hidden_size, seq_length
    kv = num_query_groups * head_dim
    q = num_attention_heads * head_dim
    attn_proj = 2 * h * (q + 2 * kv) + 2 * q * h
    attn_scores = 2 * 2 * s * q
    mlp = 2 * h * ffn_hidden_size * (3 if swiglu else 2)
    logits = 2 * h * padded_vocab_size
    per_token_forward = num_layers * (attn_proj + attn_scores + mlp) + logits
    return 3.0 * per_token_forward


def model_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """:func:`training_flops_per_token` of a ``ModelConfig`` (vocab padded as at TP 1)."""
    return training_flops_per_token(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.groups,
        head_dim=cfg.head_dim,
        padded_vocab_size=cfg.padded_vocab_size(1),
        seq_length=seq_length,
        swiglu=cfg.swiglu,
    )


def flops_per_iteration(cfg: ModelConfig, seq_length: int, global_batch_size: int) -> float:
    """Forward + backward model FLOPs of one iteration of ``global_batch_size`` sequences."""
    return model_flops_per_token(cfg, seq_length) * seq_length * global_batch_size
