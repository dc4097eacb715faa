"""Qwen2 / Qwen2.5: the Llama layout with q/k/v biases (no output-projection bias)."""

from __future__ import annotations

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.training.model import ModelConfig
from tools.convert.families.base import Family, llama_like_fields, read_llama_like, transformers_config
from tools.convert.families.llama import O_PROJ, QKV_BIAS, QKV_WEIGHT, decoder
from tools.convert.mapping import Entry


def table(cfg: ModelConfig) -> list[Entry]:
    return decoder(cfg, [QKV_WEIGHT, QKV_BIAS, O_PROJ])


def read_config(config: dict) -> ModelConfig:
    if config.get("use_sliding_window"):
        raise ConfigError(
            "Qwen2 use_sliding_window=true is not supported (Megatron-Core has no sliding window here)"
        )
    return read_llama_like(config, add_qkv_bias=True)


def write_config(cfg: ModelConfig, base: dict, dtype: torch.dtype) -> dict:
    return transformers_config("qwen2", "Qwen2ForCausalLM", llama_like_fields(cfg), base, dtype)


QWEN2 = Family("qwen2", "Qwen2ForCausalLM", "qwen2", table, read_config, write_config)
