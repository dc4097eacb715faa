"""The activation terms of the memory plan (``memory_plan.py``): what a micro-batch leaves saved.

Per micro-batch: Korthikanti et al. 2022's per-layer count
(34sbh + 5as²b with dropout and softmax saved), re-derived for this project's
layer (local spec, RMSNorm, SwiGLU, GQA, SDPA attention that keeps only a
log-sum-exp per head, no dropout) by measuring the tensors autograd saves
(``saved_tensors_hooks``; tests keep it within 10%). Per token and layer, with
e bytes per element: e * (6h + 3q + 3kv + 5ffn) + 4 * (heads + 2), plus 8h
with bf16 (the norms' fp32 copies of their input), plus RoPE's cos/sin
(4 * s * head_dim * e per layer and micro-batch). Sequence parallel divides
the hidden-sized part by TP, TP divides the rest; context parallel divides
the sequence; ``selective`` recompute drops the attention's log-sum-exp (SDPA
already recomputes its scores), ``full`` keeps only each recomputed group's
input (h * e per token). The pipeline keeps micro-batches in flight: 1F1B
holds PP - stage of them; the interleaved schedule holds Megatron-Core's
warm-up count + 1 model chunks. Full recompute adds one group's activations,
rebuilt during its backward. Not counted: transient buffers (gradients of the
logits, communication buffers) and the allocator's fragmentation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from megatron_patches.formats.model_config import ModelConfig
from megatron_patches.training.memory_plan_mla import FP32, mla_bytes_per_token, rotary_width
from megatron_patches.training.memory_plan_moe import moe_bytes_per_token

if TYPE_CHECKING:
    from megatron_patches.training.memory_plan import PlanLayout, Precision, Workload

INDEX_BYTES = 8  # int64 token ids saved by the embedding lookup
LOSS_BYTES_PER_TOKEN = 13  # labels (int64), loss mask, the final norm's inverse RMS


def chunk_role(model: ModelConfig, layout: PlanLayout, stage: int, chunk: int) -> tuple[bool, bool, int]:
    """(holds the embedding, holds the output layer, its layers) of a model chunk of pipeline ``stage``."""
    pp, vpp = layout.pipeline_parallel, layout.virtual_pipeline
    pre = stage == 0 and chunk == 0
    post = stage == pp - 1 and chunk == vpp - 1
    return pre, post, model.num_layers // (pp * vpp)


def layer_activation_bytes(
    model: ModelConfig,
    seq_length: int,
    micro_batch_size: int,
    layout: PlanLayout,
    bf16: bool,
    recompute_granularity: str | None = None,
    moe: bool = False,
) -> int:
    """Bytes one layer (MoE with ``moe``) saves for backward per micro-batch (without full recompute)."""
    tp, e = layout.tensor_parallel, (2 if bf16 else FP32)
    tokens = seq_length * micro_batch_size / layout.context_parallel
    h, heads = model.hidden_size, model.num_attention_heads
    q, kv = heads * model.head_dim, model.groups * model.head_dim
    hidden = e * 6 * h + (8 * h if bf16 else 0) + FP32 * 2  # norms and linear inputs: whole sequence
    split, whole = e * (3 * q + 3 * kv), 0.0  # whole: on every TP rank, also with sequence parallel
    if model.multi_latent_attention:
        latent, split, whole = mla_bytes_per_token(model, e, bf16)
        hidden += latent
    if moe:
        routed, shared = moe_bytes_per_token(model, layout, e)
        hidden += routed
        split += shared
    else:
        split += e * 5 * model.ffn_hidden_size
    if recompute_granularity != "selective":
        split += FP32 * heads  # SDPA's log-sum-exp
    per_token = hidden / (tp if layout.sequence_parallel else 1) + split / tp + whole
    rope = 4 * seq_length / layout.context_parallel * rotary_width(model) * e
    return round(tokens * per_token + rope)


def stage_activation_bytes(
    model: ModelConfig,
    seq_length: int,
    micro_batch_size: int,
    layout: PlanLayout,
    bf16: bool,
    stage: int,
    recompute: tuple = (None, None, None),
) -> int:
    """Bytes one micro-batch leaves saved on pipeline ``stage`` (all its model chunks)."""
    granularity, method, group = recompute
    tokens = seq_length * micro_batch_size / layout.context_parallel
    args = (model, seq_length, micro_batch_size, layout, bf16, granularity)
    dense = layer_activation_bytes(*args)
    by_kind = (dense, layer_activation_bytes(*args, moe=True) if model.num_moe_experts is not None else dense)
    e = 2 if bf16 else FP32
    sp = layout.tensor_parallel if layout.sequence_parallel else 1
    total = 0
    for chunk in range(layout.virtual_pipeline):
        pre, post, layers = chunk_role(model, layout, stage, chunk)
        first = chunk * (model.num_layers // layout.virtual_pipeline) + stage * layers
        kinds = model.moe_layer_pattern()[first : first + layers]
        if granularity == "full":  # a group of MoE and dense layers: counted at their mean
            layer = sum(by_kind[kind] for kind in kinds) / layers
            total += _full_recompute_bytes(layers, layer, tokens * model.hidden_size * e / sp, method, group)
            total += seq_length / layout.context_parallel * rotary_width(model) * FP32  # rotary freqs
        else:
            total += sum(by_kind[kind] for kind in kinds)
        if pre:
            total += tokens * INDEX_BYTES
        if post:
            total += _output_bytes(model, tokens, layout, e, bf16)
    return round(total)


def _full_recompute_bytes(layers: int, layer: int, layer_input: float, method: str, group: int) -> float:
    if method == "block":  # the first `group` layers of the chunk recomputed, the rest kept
        kept = max(layers - group, 0)
        return min(group, layers) * layer_input + kept * layer
    return math.ceil(layers / group) * layer_input  # uniform: each group keeps its input


def _output_bytes(model: ModelConfig, tokens: float, layout: PlanLayout, e: int, bf16: bool) -> float:
    """Final norm, output layer input and the fp32 logits of the loss."""
    tp = layout.tensor_parallel
    h = model.hidden_size
    hidden = e * 3 * h + (4 * h if bf16 else 0)
    vocab = model.padded_vocab_size(tp) // tp
    return tokens * (hidden / (tp if layout.sequence_parallel else 1) + FP32 * vocab + LOSS_BYTES_PER_TOKEN)


def micro_batches_in_flight(layout: PlanLayout, stage: int, num_micro_batches: int) -> float:
    """Micro-batches whose activations a stage holds at once, in units of the whole stage."""
    pp, vpp = layout.pipeline_parallel, layout.virtual_pipeline
    if vpp == 1:
        return min(pp - stage, num_micro_batches)
    # Megatron-Core's interleaved warm-up, in model chunks (each 1/vpp of the stage), plus the one in 1F1B
    warmup = (pp - stage - 1) * 2 + (vpp - 1) * pp
    chunks = min(warmup + 1, num_micro_batches * vpp)
    return chunks / vpp


def recompute_working_bytes(
    model: ModelConfig, layout: PlanLayout, precision: Precision, work: Workload
) -> int:
    """Full recompute rebuilds one group's activations during its backward: they exist for a moment."""
    granularity, method, group = work.recompute
    if granularity != "full":
        return 0
    layers = group if method == "uniform" else 1
    kinds = (False, True) if model.num_moe_experts is not None else (False,)
    args = (model, work.seq_length, work.micro_batch_size, layout, precision.bf16)
    return layers * max(layer_activation_bytes(*args, moe=moe) for moe in kinds)
