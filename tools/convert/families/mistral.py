"""Mistral: the Llama layout without attention biases, optionally with a sliding window."""

from __future__ import annotations

import torch

from megatron_patches.formats.model_config import ModelConfig
from tools.convert.families.base import Family, llama_like_fields, read_llama_like, transformers_config, warn
from tools.convert.families.llama import O_PROJ, QKV_WEIGHT, decoder
from tools.convert.mapping import Entry


def table(cfg: ModelConfig) -> list[Entry]:
    return decoder(cfg, [QKV_WEIGHT, O_PROJ])


def read_config(config: dict) -> ModelConfig:
    cfg = read_llama_like(config)
    window = config.get("sliding_window")
    if window is not None and window < cfg.max_position_embeddings:
        # Weights convert exactly; only attention past the window differs, and
        # Megatron-Core's local attention spec has no sliding window.
        warn(f"sliding_window={window} is not represented in Megatron-Core; sequences longer than it differ")
    return cfg


def write_config(cfg: ModelConfig, base: dict, dtype: torch.dtype) -> dict:
    fields = llama_like_fields(cfg) | {"sliding_window": base.get("sliding_window")}
    return transformers_config("mistral", "MistralForCausalLM", fields, base, dtype)


MISTRAL = Family("mistral", "MistralForCausalLM", "mistral", table, read_config, write_config)
