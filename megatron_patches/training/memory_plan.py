"""Memory per GPU and model FLOPs of a run, from the config alone (pure functions, no Megatron import).

Static part, as Megatron-Core 0.16.1 allocates it with the distributed optimizer
(``param_and_grad_buffer.py``, ``distrib_optimizer.py``): one contiguous buffer
of weights (params dtype) and one of fp32 gradients (``grad_reduce_in_fp32``)
per model chunk, each param starting at a multiple of 64 elements and each
bucket padded to a multiple of lcm(DP, 128); every DP rank owns 1/DP of each
bucket and keeps, for the params inside its shard only, Adam's m and v in fp32
(plus an fp32 master copy with bf16 weights). These sums are exact (tests
compare them with the tensors on each rank).

Activations (a micro-batch's saved tensors, the micro-batches in flight, full
recompute's working set): ``memory_plan_activations.py``; the GPU check
(bench/gpu_check.sh) compares the whole plan with the measured peak. MoE and
Multi-Latent Attention terms: ``memory_plan_moe.py``, ``memory_plan_mla.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_patches.flops import flops_per_iteration
from megatron_patches.formats.model_config import ModelConfig
from megatron_patches.training.memory_plan_activations import (
    chunk_role,
    micro_batches_in_flight,
    recompute_working_bytes,
    stage_activation_bytes,
)
from megatron_patches.training.memory_plan_mla import mla_attention_numels
from megatron_patches.training.memory_plan_moe import expert_param_numels, moe_dense_numels

GIB = 1024**3
FP32 = 4
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
        pre, post, layers = chunk_role(model, layout, stage, chunk)
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
                per_micro * in_flight + recompute_working_bytes(model, layout, precision, work)
            ),
            micro_batch_size=work.micro_batch_size,
            flops_per_iteration=flops_per_iteration(model, work.seq_length, work.global_batch_size),
        )
        if best is None or candidate.total > best.total:
            best = candidate
    return best


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
