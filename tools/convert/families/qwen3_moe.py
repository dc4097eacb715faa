"""Qwen3-MoE: Qwen3 attention (q/k norm, explicit head_dim) and routed experts, no shared expert."""

from __future__ import annotations

import dataclasses

import torch

from megatron_patches.formats.model_config import ModelConfig
from tools.convert.families import qwen3
from tools.convert.families.base import Family, llama_like_fields, transformers_config
from tools.convert.families.llama import K_NORM, Q_NORM, biased_attention, decoder
from tools.convert.families.moe import QWEN_MOE_MLP, qwen_moe_config, qwen_moe_fields, require_router
from tools.convert.mapping import Entry


def table(cfg: ModelConfig) -> list[Entry]:
    return decoder(cfg, biased_attention(cfg, Q_NORM, K_NORM), mlp=QWEN_MOE_MLP)


def read_config(config: dict) -> ModelConfig:
    return dataclasses.replace(qwen3.read_config(config), **qwen_moe_fields(config))


def write_config(cfg: ModelConfig, base: dict, dtype: torch.dtype) -> dict:
    require_router(cfg, "Qwen3-MoE")
    fields = llama_like_fields(cfg) | {"head_dim": cfg.head_dim, "attention_bias": cfg.add_qkv_bias}
    fields |= qwen_moe_config(cfg)
    config = transformers_config("qwen3_moe", "Qwen3MoeForCausalLM", fields, base, dtype)
    # transformers 5 writes num_local_experts; 4.x reads num_experts (else its default, 128).
    return config | {"num_experts": cfg.num_moe_experts}


QWEN3_MOE = Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", table, read_config, write_config)
