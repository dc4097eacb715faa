"""Mixture-of-Experts building blocks every MoE family shares: router, routed experts, shared expert.

Routed-expert entries name expert ``{j}`` (its global number); ``Family.expand``
makes one entry per expert, and the EP split (which rank holds expert ``j``, under
which local number) belongs to ``tools.convert.layout`` / ``mapping.expert_place``,
never to a family. The MLP entries of dense layers (``GATE_UP``/``DOWN``) stay in
the table: ``Family.expand`` keeps, per layer, those of its kind
(``ModelConfig.moe_layer_pattern``).
"""

from __future__ import annotations

from typing import Any

from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig
from tools.convert.families.llama import DOWN, GATE_UP, H, L
from tools.convert.mapping import EXPERT, Entry, GatedMLP, Replicated, RowParallel

EXPERTS = f"{L}mlp.experts.local_experts.{EXPERT}."


def router(block: str) -> Entry:
    """Megatron-Core's ``TopKRouter`` weight [experts, hidden]: the same on every TP and EP rank."""
    return Replicated(f"{L}mlp.router.weight", (f"{H}{block}.gate.weight",))


def routed_experts(block: str, gate: str, up: str, down: str) -> list[Entry]:
    """Expert ``{j}``'s SwiGLU MLP; HF stores one tensor per expert on disk (transformers 5 fuses them
    into ``gate_up_proj``/``down_proj`` only in memory, through its checkpoint conversion mapping)."""
    hf = f"{H}{block}.experts.{EXPERT}."
    return [
        GatedMLP(f"{EXPERTS}linear_fc1.weight", (f"{hf}{gate}.weight", f"{hf}{up}.weight")),
        RowParallel(f"{EXPERTS}linear_fc2.weight", (f"{hf}{down}.weight",)),
    ]


# Qwen2-MoE's shared expert with its sigmoid gate (Megatron-Core: moe_shared_expert_gate).
SHARED_EXPERT = (
    Replicated(f"{L}mlp.shared_experts.gate_weight", (f"{H}mlp.shared_expert_gate.weight",)),
    GatedMLP(
        f"{L}mlp.shared_experts.linear_fc1.weight",
        (f"{H}mlp.shared_expert.gate_proj.weight", f"{H}mlp.shared_expert.up_proj.weight"),
    ),
    RowParallel(f"{L}mlp.shared_experts.linear_fc2.weight", (f"{H}mlp.shared_expert.down_proj.weight",)),
)
QWEN_MOE_MLP = (GATE_UP, DOWN, router("mlp"), *routed_experts("mlp", "gate_proj", "up_proj", "down_proj"))


def qwen_moe_fields(config: dict) -> dict[str, Any]:
    """ModelConfig MoE fields of a Qwen2/Qwen3-MoE config (dense layers: mlp_only_layers, sparse step)."""
    experts = config.get("num_experts") or config.get("num_local_experts") or 0  # Qwen3-MoE in transformers 5
    if experts < 1:
        raise ConfigError(f"num_experts must be >= 1 in an MoE config, got {experts}")
    step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
    # transformers' Qwen2MoeDecoderLayer: MoE unless listed in mlp_only_layers or off the sparse step.
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(config["num_hidden_layers"])]
    return {
        "num_moe_experts": experts,
        "moe_router_topk": config.get("num_experts_per_tok", 2),
        "moe_ffn_hidden_size": config["moe_intermediate_size"],
        # norm_topk_prob=false: softmax over all experts, then top-k (no renormalization).
        "moe_router_pre_softmax": not config.get("norm_topk_prob", False),
        "moe_layer_freq": 1 if all(pattern) else pattern,
    }


def qwen_moe_config(cfg: ModelConfig) -> dict[str, Any]:
    """Inverse of :func:`qwen_moe_fields`."""
    return {
        "num_experts": cfg.num_moe_experts,
        "num_experts_per_tok": cfg.moe_router_topk,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
        "norm_topk_prob": not cfg.moe_router_pre_softmax,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, moe in enumerate(cfg.moe_layer_pattern()) if not moe],
    }


def require_router(cfg: ModelConfig, family: str, pre_softmax: bool | None = None) -> None:
    """The HF model computes ``cfg``'s routing: softmax router, no expert bias, groups or scaling.

    ``pre_softmax``: the only value the family's HF router has (None: either, via norm_topk_prob).
    """
    if not cfg.num_moe_experts:
        raise ConfigError(f"{family} is an MoE family; this model is dense (num_moe_experts unset)")
    unsupported = {
        "moe_router_score_function": (cfg.moe_router_score_function, "softmax"),
        "moe_router_enable_expert_bias": (cfg.moe_router_enable_expert_bias, False),
        "moe_router_num_groups": (cfg.moe_router_num_groups, None),
        "moe_router_topk_scaling_factor": (cfg.moe_router_topk_scaling_factor, None),
    }
    if pre_softmax is not None:
        unsupported["moe_router_pre_softmax"] = (cfg.moe_router_pre_softmax, pre_softmax)
    for name, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ConfigError(f"{family} routes with {name}={wanted!r}; this model has {value!r}")
