"""Qwen2-MoE / Qwen1.5-MoE: Qwen2 attention (qkv biases), routed experts, a sigmoid-gated shared expert."""

from __future__ import annotations

import dataclasses

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig
from tools.convert.families.base import (
    Family,
    llama_like_fields,
    read_llama_like,
    refuse_sliding_window,
    transformers_config,
)
from tools.convert.families.llama import O_PROJ, QKV_BIAS, QKV_WEIGHT, decoder
from tools.convert.families.moe import (
    QWEN_MOE_MLP,
    SHARED_EXPERT,
    qwen_moe_config,
    qwen_moe_fields,
    require_router,
)
from tools.convert.mapping import Entry


def table(cfg: ModelConfig) -> list[Entry]:
    attention = [QKV_WEIGHT, QKV_BIAS, O_PROJ] if cfg.add_qkv_bias else [QKV_WEIGHT, O_PROJ]
    return decoder(cfg, attention, mlp=(*QWEN_MOE_MLP, *SHARED_EXPERT))


def read_config(config: dict) -> ModelConfig:
    refuse_sliding_window(config, "Qwen2-MoE")
    if not config.get("shared_expert_intermediate_size"):
        raise ConfigError("Qwen2-MoE config lacks shared_expert_intermediate_size (shared expert width)")
    cfg = read_llama_like(config, add_qkv_bias=bool(config.get("qkv_bias", True)))
    moe = qwen_moe_fields(config) | {
        "moe_shared_expert_intermediate_size": config["shared_expert_intermediate_size"],
        "moe_shared_expert_gate": True,
    }
    return dataclasses.replace(cfg, **moe)


def write_config(cfg: ModelConfig, base: dict, dtype: torch.dtype) -> dict:
    require_router(cfg, "Qwen2-MoE")
    if not (cfg.moe_shared_expert_intermediate_size and cfg.moe_shared_expert_gate):
        raise ConfigError("Qwen2-MoE has a sigmoid-gated shared expert in each MoE layer; this model has not")
    fields = llama_like_fields(cfg) | qwen_moe_config(cfg)
    fields |= {"shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size}
    fields["qkv_bias"] = cfg.add_qkv_bias
    return transformers_config("qwen2_moe", "Qwen2MoeForCausalLM", fields, base, dtype)


QWEN2_MOE = Family("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", table, read_config, write_config)
