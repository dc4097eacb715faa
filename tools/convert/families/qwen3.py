"""Qwen3 (dense): RMSNorm on each query and key head, explicit ``head_dim``."""

from __future__ import annotations

import torch

from megatron_patches.formats.model_config import ModelConfig
from tools.convert.families.base import (
    Family,
    llama_like_fields,
    read_llama_like,
    refuse_sliding_window,
    transformers_config,
)
from tools.convert.families.llama import K_NORM, Q_NORM, biased_attention, decoder
from tools.convert.mapping import Entry


def table(cfg: ModelConfig) -> list[Entry]:
    return decoder(cfg, biased_attention(cfg, Q_NORM, K_NORM))


def read_config(config: dict) -> ModelConfig:
    refuse_sliding_window(config, "Qwen3")
    return read_llama_like(config, qk_layernorm=True, add_qkv_bias=bool(config.get("attention_bias", False)))


def write_config(cfg: ModelConfig, base: dict, dtype: torch.dtype) -> dict:
    fields = llama_like_fields(cfg) | {"head_dim": cfg.head_dim, "attention_bias": cfg.add_qkv_bias}
    return transformers_config("qwen3", "Qwen3ForCausalLM", fields, base, dtype)


QWEN3 = Family("qwen3", "Qwen3ForCausalLM", "qwen3", table, read_config, write_config)
