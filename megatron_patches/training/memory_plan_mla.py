"""The Multi-Latent Attention terms of the memory plan (``memory_plan.py``): an MLA layer's params
and activations.

Megatron-Core's ``MLASelfAttention`` (``transformer/multi_latent_attention.py``) registers, after
the ``linear_proj`` its base class builds: the query projection (``linear_q_proj``, or with
``q_lora_rank`` the ``linear_q_down_proj`` to the query latent and ``linear_q_up_proj`` back to
the heads), ``linear_kv_down_proj`` to the key/value latent plus the shared rotary key,
``linear_kv_up_proj`` to the heads' keys and values, then the latent norms (``qk_layernorm``).
The local spec splits the down projections over TP (``ColumnParallelLinear``; the forward
gathers their outputs); Transformer Engine's spec keeps them whole on every rank (``TELinear``,
``parallel_mode='duplicated'``) and fuses the latent norms into the up projections (same sizes).
"""

from __future__ import annotations

from megatron_patches.formats.model_config import ModelConfig

FP32 = 4


def mla_attention_numels(model: ModelConfig, tp: int) -> list[int]:
    """One TP rank's params of an MLA layer's ``self_attention``, in registration order."""
    h, heads = model.hidden_size, model.num_attention_heads // tp
    qk = model.qk_head_dim + model.qk_pos_emb_head_dim
    down_split = 1 if model.transformer_impl == "transformer_engine" else tp
    numels = [h * heads * model.v_head_dim]  # linear_proj
    if model.add_bias_linear:
        numels.append(h)
    if model.q_lora_rank is None:
        numels.append(heads * qk * h)  # linear_q_proj
    else:
        numels += [model.q_lora_rank // down_split * h, heads * qk * model.q_lora_rank]
    kv_latent = model.kv_lora_rank + model.qk_pos_emb_head_dim
    kv_heads = heads * (model.qk_head_dim + model.v_head_dim)
    numels += [kv_latent // down_split * h, kv_heads * model.kv_lora_rank]  # kv down, kv up
    if model.qk_layernorm:
        numels += [model.q_lora_rank] if model.q_lora_rank is not None else []
        numels.append(model.kv_lora_rank)
    return numels


def rotary_width(model: ModelConfig) -> int:
    """Width of the rotary embedding's cos/sin: MLA rotates only ``qk_pos_emb_head_dim`` per head."""
    return model.qk_pos_emb_head_dim if model.multi_latent_attention else model.head_dim


def mla_bytes_per_token(model: ModelConfig, e: int, bf16: bool) -> tuple[float, float, float]:
    """(latent, heads, rotary key) bytes an MLA layer's attention saves per token, measured with
    ``saved_tensors_hooks`` at TP 1 with a fused SDPA (v_head_dim equal to the query/key width: on CPU
    others fall back to the unfused kernel that keeps the s x s scores; GPU kernels do not).

    latent: each latent norm keeps what a hidden-size norm and its linear input keep (3 copies, an fp32
    one with bf16, the inverse RMS), or without ``qk_layernorm`` only the up projection's input; the
    latents are whole on every TP rank (the down projections' outputs are gathered), sequence parallel
    splits them. heads: 2 copies of each head's query/key width and 2 of its value width (split
    over TP). rotary key: 2 copies of the one rotary key every head shares (whole on every TP rank).
    """
    latents = [model.kv_lora_rank] + ([model.q_lora_rank] if model.q_lora_rank is not None else [])
    if model.qk_layernorm:
        latent = sum((3 * e + (FP32 if bf16 else 0)) * width + FP32 for width in latents)
    else:
        latent = sum(e * width for width in latents)
    qk = model.qk_head_dim + model.qk_pos_emb_head_dim
    heads = e * model.num_attention_heads * (2 * qk + 2 * model.v_head_dim)
    return latent, heads, 2 * e * model.qk_pos_emb_head_dim
