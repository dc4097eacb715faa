"""Memory per GPU and model FLOPs of a run, from the config alone (pure functions, no Megatron import).

Static part, as Megatron-Core 0.16.1 allocates it with the distributed optimizer
(``param_and_grad_buffer.py``, ``distrib_optimizer.py``): one contiguous buffer
of weights (params dtype) and one of fp32 gradients (``grad_reduce_in_fp32``)
per model chunk, each param starting at a multiple of 64 elements and each
bucket padded to a multiple of lcm(DP, 128); every DP rank owns 1/DP of each
bucket and keeps, for the params inside its shard only, Adam's m and v in fp32
(plus an fp32 master copy with bf16 weights). These sums are exact (tests
compare them with the tensors on each rank).

Activations, per micro-batch: Korthikanti et al. 2022's per-layer count
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
logits, communication buffers) and the allocator's fragmentation; the GPU check
(bench/gpu_check.sh) compares the plan with the measured peak. MoE and Multi-Latent Attention
terms: ``memory_plan_moe.py``, ``memory_plan_mla.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_patches.flops import flops_per_iteration
from megatron_patches.formats.model_config import ModelConfig
from megatron_patches.training.memory_plan_mla import mla_attention_numels, mla_bytes_per_token, rotary_width
from megatron_patches.training.memory_plan_moe import (
    expert_param_numels,
    moe_bytes_per_token,
    moe_dense_numels,
)

GIB = 1024**3
FP32 = 4
INDEX_BYTES = 8  # int64 token ids saved by the embedding lookup
LOSS_BYTES_PER_TOKEN = 13  # labels (int64), loss mask, the final norm's inverse RMS
PARAM_ALIGN = 64  # elements: every param starts at a 128-byte address (bf16)
BUCKET_ALIGN = 128


@dataclass(frozen=True)
class PlanLayout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    context_parallel: int = 1
    virtual_pipeline: int = 1  # model chunks per pipeline rank (interleaved 1F1B when > 1)
    sequence_parallel: bool = False
    expert_parallel: int = 1  # EP: routed experts split over this many ranks
    expert_tensor_parallel: int = 1  # ETP: each expert's FFN split

    @property
    def expert_data_parallel(self) -> int:
        """Replicas of each expert, its optimizer's shards (Megatron-Core's expert grid: ETP x EP x
        expert-DP covers a stage's TP x CP x DP ranks)."""
        ranks = self.tensor_parallel * self.context_parallel * self.data_parallel
        return max(ranks // (self.expert_tensor_parallel * self.expert_parallel), 1)


@dataclass(frozen=True)
class Precision:
    bf16: bool = True
    bucket_size: int | None = None  # DDP bucket (elements); None: one bucket per chunk

    @property
    def param_bytes(self) -> int:
        return 2 if self.bf16 else FP32


@dataclass
class MemoryPlan:
    weights: int  # bytes on the fullest rank
    gradients: int
    optimizer: int
    activations_per_micro_batch: int  # of the fullest stage
    micro_batches_in_flight: int
    activations: int
    micro_batch_size: int
    flops_per_iteration: float

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        """One line: the breakdown in GiB per GPU."""
        return (
            f"memory per GPU: {gib(self.total)} = weights {gib(self.weights)} + gradients "
            f"{gib(self.gradients)} + optimizer {gib(self.optimizer)} + activations {gib(self.activations)} "
            f"({gib(self.activations_per_micro_batch)} per micro-batch of {self.micro_batch_size} "
            f"x {self.micro_batches_in_flight} in flight); model FLOPs per iteration "
            f"{self.flops_per_iteration:.3g}"
        )


def gib(num_bytes: float) -> str:
    """GiB with two decimals (MiB below one GiB, so tiny CPU models show a size too)."""
    if num_bytes < GIB:
        return f"{num_bytes / 1024**2:.2f} MiB"
    return f"{num_bytes / GIB:.2f} GiB"


def chunk_param_numels(
    model: ModelConfig, tp: int, pre_process: bool, post_process: bool, num_layers: int, first_layer: int = 0
) -> list[tuple[int, bool]]:
    """(numel, shared_embedding) of one model chunk's params on one TP rank, in registration order.

    Routed experts excluded: they live in a buffer of their own (:func:`expert_param_numels`).
    """
    h, vocab = model.hidden_size, model.padded_vocab_size(tp) // tp
    q, kv = model.num_attention_heads * model.head_dim, model.groups * model.head_dim
    tied = not model.untie_embeddings_and_output_weights
    numels: list[tuple[int, bool]] = []
    if pre_process:
        numels.append((vocab * h, tied and not post_process))
        if model.position_embedding_type == "learned_absolute":
            numels.append((model.max_position_embeddings * h, False))
    pattern = model.moe_layer_pattern()
    for layer in range(first_layer, first_layer + num_layers):
        numels += [(n, False) for n in _layer_numels(model, tp, h, q, kv, moe=bool(pattern[layer]))]
    if post_process:
        numels.append((h, False))  # final norm
        if not tied or not pre_process:
            numels.append((vocab * h, tied))  # with tied weights on PP > 1: the last stage's copy
    return numels


def _layer_numels(model: ModelConfig, tp: int, h: int, q: int, kv: int, moe: bool = False) -> list[int]:
    ffn = model.ffn_hidden_size // tp
    fc1 = ffn * (2 if model.swiglu else 1)
    if model.multi_latent_attention:
        numels = [h, *mla_attention_numels(model, tp)]  # input norm, then MLA's projections and norms
    else:
        numels = [h, h * q // tp, (q + 2 * kv) // tp * h]  # input norm, linear_proj, linear_qkv
        if model.add_bias_linear:
            numels.append(h)
        if model.add_qkv_bias or model.add_bias_linear:
            numels.append((q + 2 * kv) // tp)
        if model.qk_layernorm:
            numels += [model.head_dim, model.head_dim]
    if moe:
        return numels + [h, *moe_dense_numels(model, tp, h)]
    numels += [h, fc1 * h, h * ffn]  # pre-MLP norm, fc1, fc2
    if model.add_bias_linear:
        numels += [fc1, h]
    return numels


def bucket_ranges(params: list[tuple[int, bool]], dp: int, bucket_size: int | None) -> tuple:
    """Megatron-Core's buffer layout: ([(start, end) per param], [(start, end) per bucket])."""
    param_ranges, buckets = [], []
    start = bucket_start = 0
    in_bucket = 0

    def close(end: int) -> int:
        nonlocal bucket_start, in_bucket
        padded = _pad(end, math.lcm(dp, BUCKET_ALIGN))
        buckets.append((bucket_start, padded))
        bucket_start, in_bucket = padded, 0
        return padded

    for numel, shared in reversed(params):  # backward order, as the buffer
        start = _pad(start, PARAM_ALIGN)
        if shared and in_bucket:
            start = close(start)
        end = start + numel
        param_ranges.append((start, end))
        in_bucket += 1
        full = bucket_size is not None and end - bucket_start >= bucket_size
        start = close(end) if full or shared else end
    if in_bucket:
        close(end)
    return param_ranges, buckets


def _pad(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def shard_numel(param_ranges: list, buckets: list, dp: int, dp_rank: int) -> int:
    """Elements of real params (not padding) inside this DP rank's shard of every bucket."""
    total = 0
    for bucket_start, bucket_end in buckets:
        size = (bucket_end - bucket_start) // dp
        lo, hi = bucket_start + dp_rank * size, bucket_start + (dp_rank + 1) * size
        total += sum(max(0, min(hi, end) - max(lo, start)) for start, end in param_ranges)
    return total


def static_bytes(
    model: ModelConfig,
    layout: PlanLayout,
    precision: Precision,
    stage: int,
    dp_rank: int = 0,
    expert_dp_rank: int = 0,
) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes of one rank of pipeline ``stage``.

    MoE: the routed experts have their own buffer, sharded over the expert-data-parallel ranks.
    """
    totals = [0, 0, 0]
    for chunk in range(layout.virtual_pipeline):
        pre, post, layers = _chunk_role(model, layout, stage, chunk)
        first = chunk * (model.num_layers // layout.virtual_pipeline) + stage * layers
        dense = chunk_param_numels(model, layout.tensor_parallel, pre, post, layers, first)
        experts = expert_param_numels(model, layout, first, layers)
        # Megatron-Core buckets only the first stage's first chunk (later ones are off the critical path)
        bucket_size = precision.bucket_size if stage == 0 and chunk == 0 else None
        for params, dp, rank in (
            (dense, layout.data_parallel, dp_rank),
            (experts, layout.expert_data_parallel, expert_dp_rank),
        ):
            for i, value in enumerate(_buffer_bytes(params, dp, rank, bucket_size, precision)):
                totals[i] += value
    return totals[0], totals[1], totals[2]


def _buffer_bytes(
    params: list, dp: int, dp_rank: int, bucket_size: int | None, precision: Precision
) -> tuple:
    """(weights, gradients, optimizer state) of one DDP buffer and this DP rank's optimizer shard."""
    if not params:
        return 0, 0, 0
    param_ranges, buckets = bucket_ranges(params, dp, bucket_size)
    numel = buckets[-1][1] if buckets else 0
    states = 3 if precision.bf16 else 2  # Adam m and v (+ fp32 master weights with bf16)
    optimizer = states * FP32 * shard_numel(param_ranges, buckets, dp, dp_rank)
    return numel * precision.param_bytes, numel * FP32, optimizer


def _chunk_role(model: ModelConfig, layout: PlanLayout, stage: int, chunk: int) -> tuple[bool, bool, int]:
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
        pre, post, layers = _chunk_role(model, layout, stage, chunk)
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


@dataclass(frozen=True)
class Workload:
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    recompute: tuple = (None, None, None)  # granularity, method, num_layers


def plan_memory(model: ModelConfig, layout: PlanLayout, precision: Precision, work: Workload) -> MemoryPlan:
    """The fullest rank's memory: every pipeline stage (and DP rank 0's shard) considered."""
    num_micro = work.global_batch_size // (work.micro_batch_size * layout.data_parallel)
    best = None
    for stage in range(layout.pipeline_parallel):
        static = static_bytes(model, layout, precision, stage)
        per_micro = stage_activation_bytes(
            model, work.seq_length, work.micro_batch_size, layout, precision.bf16, stage, work.recompute
        )
        in_flight = micro_batches_in_flight(layout, stage, num_micro)
        candidate = MemoryPlan(
            *static,
            activations_per_micro_batch=per_micro,
            micro_batches_in_flight=math.ceil(in_flight),
            activations=round(
                per_micro * in_flight + _recompute_working_bytes(model, layout, precision, work)
            ),
            micro_batch_size=work.micro_batch_size,
            flops_per_iteration=flops_per_iteration(model, work.seq_length, work.global_batch_size),
        )
        if best is None or candidate.total > best.total:
            best = candidate
    return best


def _recompute_working_bytes(
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


def largest_micro_batch(
    model: ModelConfig, layout: PlanLayout, precision: Precision, work: Workload, budget: float
) -> int:
    """The largest micro-batch (a divisor of the batch per DP rank) that fits ``budget`` bytes; 0: none."""
    per_rank = work.global_batch_size // layout.data_parallel
    fitting = [
        mbs
        for mbs in range(1, per_rank + 1)
        if per_rank % mbs == 0
        and plan_memory(model, layout, precision, _with_micro(work, mbs)).total <= budget
    ]
    return max(fitting, default=0)


def _with_micro(work: Workload, micro_batch_size: int) -> Workload:
    return Workload(work.seq_length, micro_batch_size, work.global_batch_size, work.recompute)
