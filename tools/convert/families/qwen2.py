"""Qwen2 / Qwen2.5: the Llama layout with q/k/v biases (no output-projection bias)."""

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
from tools.convert.families.llama import O_PROJ, QKV_BIAS, QKV_WEIGHT, decoder
from tools.convert.mapping import Entry


def table(cfg: ModelConfig) -> list[Entry]:
    return decoder(cfg, [QKV_WEIGHT, QKV_BIAS, O_PROJ])


def read_config(config: dict) -> ModelConfig:
    refuse_sliding_window(config, "Qwen2")
    return read_llama_like(config, add_qkv_bias=True)


def write_config(cfg: ModelConfig, base: dict, dtype: torch.dtype) -> dict:
    return transformers_config("qwen2", "Qwen2ForCausalLM", llama_like_fields(cfg), base, dtype)


QWEN2 = Family("qwen2", "Qwen2ForCausalLM", "qwen2", table, read_config, write_config)
