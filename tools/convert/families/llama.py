"""Llama 2 / 3 / 3.1 (and the Llama-architecture Yi and DeepSeek dense models).

The entries below are the building blocks every Llama-style family reuses;
each family's ``table`` says which attention entries and which head it has.
"""

from __future__ import annotations

import torch

from megatron_patches.formats.model_config import ModelConfig
from tools.convert.families.base import Family, llama_like_fields, read_llama_like, transformers_config
from tools.convert.mapping import QKV, Entry, GatedMLP, Replicated, RowParallel, VocabParallel, ZeroBias

L = "decoder.layers.{i}."
H = "model.layers.{i}."


def _qkv(kind: str) -> QKV:
    return QKV(f"{L}self_attention.linear_qkv.{kind}", tuple(f"{H}self_attn.{p}_proj.{kind}" for p in "qkv"))


EMBEDDING = VocabParallel("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))
INPUT_NORM = Replicated(f"{L}input_layernorm.weight", (f"{H}input_layernorm.weight",))
QKV_WEIGHT = _qkv("weight")
QKV_BIAS = _qkv("bias")
O_PROJ = RowParallel(f"{L}self_attention.linear_proj.weight", (f"{H}self_attn.o_proj.weight",))
O_PROJ_ZERO_BIAS = ZeroBias(f"{H}self_attn.o_proj.bias")
Q_NORM = Replicated(f"{L}self_attention.q_layernorm.weight", (f"{H}self_attn.q_norm.weight",))
K_NORM = Replicated(f"{L}self_attention.k_layernorm.weight", (f"{H}self_attn.k_norm.weight",))
POST_ATTENTION_NORM = Replicated(f"{L}pre_mlp_layernorm.weight", (f"{H}post_attention_layernorm.weight",))
GATE_UP = GatedMLP(f"{L}mlp.linear_fc1.weight", (f"{H}mlp.gate_proj.weight", f"{H}mlp.up_proj.weight"))
DOWN = RowParallel(f"{L}mlp.linear_fc2.weight", (f"{H}mlp.down_proj.weight",))
FINAL_NORM = Replicated("decoder.final_layernorm.weight", ("model.norm.weight",))
LM_HEAD = VocabParallel("output_layer.weight", ("lm_head.weight",))


def decoder(
    cfg: ModelConfig, attention: list[Entry], head: Entry = LM_HEAD, mlp: tuple[Entry, ...] = (GATE_UP, DOWN)
) -> list[Entry]:
    """The Llama layout around a family's attention (and MLP) entries; tied models have no own head."""
    entries = [EMBEDDING, INPUT_NORM, *attention, POST_ATTENTION_NORM, *mlp, FINAL_NORM]
    return [*entries, head] if cfg.untie_embeddings_and_output_weights else entries


def biased_attention(cfg: ModelConfig, *qk_norms: Entry) -> list[Entry]:
    """HF ``attention_bias`` adds q/k/v/o biases; Megatron-Core has q/k/v only, so o's must be zero."""
    if cfg.add_qkv_bias:
        return [QKV_WEIGHT, QKV_BIAS, *qk_norms, O_PROJ, O_PROJ_ZERO_BIAS]
    return [QKV_WEIGHT, *qk_norms, O_PROJ]


def table(cfg: ModelConfig) -> list[Entry]:
    return decoder(cfg, biased_attention(cfg))


def read_config(config: dict) -> ModelConfig:
    return read_llama_like(config, add_qkv_bias=bool(config.get("attention_bias", False)))


def write_config(cfg: ModelConfig, base: dict, dtype: torch.dtype) -> dict:
    fields = llama_like_fields(cfg) | {"attention_bias": cfg.add_qkv_bias, "mlp_bias": False}
    return transformers_config("llama", "LlamaForCausalLM", fields, base, dtype)


LLAMA = Family("llama", "LlamaForCausalLM", "llama", table, read_config, write_config)
