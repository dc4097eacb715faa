"""Model FLOPs per token and per iteration (Megatron-LM's accounting), from plain numbers.

The trainer's MFU estimate and ``tools/scaling`` (compute budgets of a grid)
count the same FLOPs, so the formula lives here, below both.
Per token and layer: QKV and output projections with GQA, attention scores
and values (causal mask not discounted, as Megatron-LM), and the MLP (3
matrices with SwiGLU); plus the output layer. Backward costs twice forward.
No activation recompute is counted. A MoE layer's MLP counts the experts a token
is routed to (top-k x ``moe_ffn_hidden_size``) plus the shared experts, as Megatron-LM's
``num_floating_point_operations`` (the router's small GEMM is not counted there either).
Multi-Latent Attention counts its own projections (down to the latents, their norms, up to the
heads) and scores of width ``qk_head_dim + qk_pos_emb_head_dim`` over values of ``v_head_dim``, as
that function's ``multi_latent_attention`` branch (whose causal halving of the scores is left out
here as for standard attention, so both kinds of model are counted alike).
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
    moe_layers: int = 0,
    moe_active_ffn_hidden_size: int = 0,
    attention_forward_flops: float | None = None,
) -> float:
    """Forward + backward FLOPs of one token of a ``seq_length`` sequence.

    ``moe_layers`` of the layers are MoE layers whose MLP width per token is
    ``moe_active_ffn_hidden_size`` (routed experts' and shared experts' widths together).
    ``attention_forward_flops`` replaces the standard attention's per-layer forward FLOPs (MLA).
    """
    h, s = hidden_size, seq_length
    kv = num_query_groups * head_dim
    q = num_attention_heads * head_dim
    attention = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * 2 * s * q  # projections, QK^T and AV
    if attention_forward_flops is not None:
        attention = attention_forward_flops
    mlp_width = (num_layers - moe_layers) * ffn_hidden_size + moe_layers * moe_active_ffn_hidden_size
    mlp = 2 * h * mlp_width * (3 if swiglu else 2)
    logits = 2 * h * padded_vocab_size
    per_token_forward = num_layers * attention + mlp + logits
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
        moe_layers=sum(cfg.moe_layer_pattern()),
        moe_active_ffn_hidden_size=moe_active_ffn_hidden_size(cfg),
        attention_forward_flops=mla_forward_flops(cfg, seq_length) if cfg.multi_latent_attention else None,
    )


def mla_forward_flops(cfg: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per token of one Multi-Latent Attention layer (Megatron-LM's MLA terms)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_head_dim + cfg.qk_pos_emb_head_dim
    # with a query latent: down, latent norm (one multiply per element, as Megatron-LM), up
    query = h * heads * qk if cfg.q_lora_rank is None else cfg.q_lora_rank * (h + heads * qk + 1)
    key_value = cfg.kv_lora_rank * (h + heads * (cfg.qk_head_dim + cfg.v_head_dim) + 1)
    key_value += h * cfg.qk_pos_emb_head_dim  # the shared rotary key
    output = heads * cfg.v_head_dim * h
    scores = seq_length * heads * (qk + cfg.v_head_dim)  # QK^T and AV
    return 2 * (query + key_value + output + scores)


def moe_active_ffn_hidden_size(cfg: ModelConfig) -> int:
    """The MLP width one token passes through in a MoE layer: top-k routed experts plus the shared ones."""
    if cfg.num_moe_experts is None:
        return 0
    routed = cfg.moe_router_topk * (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size)
    return routed + (cfg.moe_shared_expert_intermediate_size or 0)


def flops_per_iteration(cfg: ModelConfig, seq_length: int, global_batch_size: int) -> float:
    """Forward + backward model FLOPs of one iteration of ``global_batch_size`` sequences."""
    return model_flops_per_token(cfg, seq_length) * seq_length * global_batch_size
