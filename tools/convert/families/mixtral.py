"""Mixtral: the Mistral layout with a top-k MoE in every layer (``block_sparse_moe``: gate, w1/w3/w2)."""

from __future__ import annotations

import dataclasses

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig
from tools.convert.families import mistral
from tools.convert.families.base import Family, llama_like_fields, transformers_config
from tools.convert.families.llama import O_PROJ, QKV_WEIGHT, decoder
from tools.convert.families.moe import require_router, routed_experts, router
from tools.convert.mapping import Entry

# w1 = gate, w3 = up, w2 = down (MixtralBlockSparseTop2MLP).
MIXTRAL_MLP = (router("block_sparse_moe"), *routed_experts("block_sparse_moe", "w1", "w3", "w2"))


def table(cfg: ModelConfig) -> list[Entry]:
    return decoder(cfg, [QKV_WEIGHT, O_PROJ], mlp=MIXTRAL_MLP)


def read_config(config: dict) -> ModelConfig:
    cfg = mistral.read_config(config)  # the sliding-window warning is Mistral's
    # HF Mixtral: softmax, top-k, renormalized = Megatron-Core's top-k of the logits, then softmax.
    return dataclasses.replace(
        cfg,
        num_moe_experts=config.get("num_local_experts", 8),
        moe_router_topk=config.get("num_experts_per_tok", 2),
        moe_ffn_hidden_size=cfg.ffn_hidden_size,  # Mixtral's intermediate_size is one expert's width
    )


def write_config(cfg: ModelConfig, base: dict, dtype: torch.dtype) -> dict:
    require_router(cfg, "Mixtral", pre_softmax=False)
    if cfg.moe_ffn_hidden_size not in (None, cfg.ffn_hidden_size) or not all(cfg.moe_layer_pattern()):
        raise ConfigError("Mixtral has MoE layers only, experts intermediate_size wide; this model differs")
    fields = llama_like_fields(cfg) | {
        "sliding_window": base.get("sliding_window"),
        "num_local_experts": cfg.num_moe_experts,
        "num_experts_per_tok": cfg.moe_router_topk,
    }
    return transformers_config("mixtral", "MixtralForCausalLM", fields, base, dtype)


MIXTRAL = Family("mixtral", "MixtralForCausalLM", "mixtral", table, read_config, write_config)
