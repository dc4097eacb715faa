"""The Mixture-of-Experts terms of the memory plan (``memory_plan.py``): a MoE layer's params and
activations.

Megatron-Core's ``DistributedDataParallel`` keeps the routed experts' params in buffers of their
own (``expert_parallel_buffers``), sharded by their distributed optimizer over the
expert-data-parallel ranks; the router and the shared experts stay with the dense params. Each
EP rank holds ``num_moe_experts / EP`` experts of every MoE layer, each split over ETP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_patches.formats.model_config import ModelConfig

if TYPE_CHECKING:
    from megatron_patches.training.memory_plan import PlanLayout


def moe_dense_numels(model: ModelConfig, tp: int, h: int) -> list[int]:
    """A MoE layer's params outside the experts' buffer: the router (replicated), the shared experts'
    gate and fc1/fc2 (split over TP), as Megatron-Core's MoELayer registers them (no linear biases)."""
    numels = [model.num_moe_experts * h]
    shared = model.moe_shared_expert_intermediate_size
    if shared is None:
        return numels
    if model.moe_shared_expert_gate:
        numels.append(h)
    ffn = shared // tp
    return numels + [ffn * (2 if model.swiglu else 1) * h, h * ffn]


def expert_param_numels(model: ModelConfig, layout: PlanLayout, first_layer: int, num_layers: int) -> list:
    """(numel, False) of one rank's routed experts: ``num_moe_experts / EP`` per MoE layer, split over ETP."""
    if model.num_moe_experts is None:
        return []
    ffn = (model.moe_ffn_hidden_size or model.ffn_hidden_size) // layout.expert_tensor_parallel
    h = model.hidden_size
    per_expert = [ffn * (2 if model.swiglu else 1) * h, h * ffn]  # fc1, fc2
    moe_layers = sum(model.moe_layer_pattern()[first_layer : first_layer + num_layers])
    return [(n, False) for n in per_expert * (model.num_moe_experts // layout.expert_parallel) * moe_layers]


def moe_bytes_per_token(model: ModelConfig, layout: PlanLayout, e: int) -> tuple[float, float]:
    """(routed, shared) bytes a MoE layer saves per token, measured with ``saved_tensors_hooks`` at
    TP = EP = 1: each of the top-k copies of a token keeps its permuted input (h, all-gathered over
    ETP) and e * 6 * moe_ffn in the expert, plus 22 bytes of indices and probabilities; the router
    3 bytes per expert; the shared experts a dense MLP's 5 * width. The routed part assumes balanced
    routing (an EP rank receives top-k x its tokens)."""
    etp = layout.expert_tensor_parallel
    ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size
    routed = (
        model.moe_router_topk * (e * (model.hidden_size * etp + 6 * ffn) + 22) + 3 * model.num_moe_experts
    )
    return routed, e * 5 * (model.moe_shared_expert_intermediate_size or 0)
