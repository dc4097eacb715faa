"""Baichuan2-7B: fused ``W_pack`` q/k/v and a NormHead output layer.

Its modeling code ships with the checkpoint (``trust_remote_code``), not with
transformers, so ``config.json`` is read and written as a plain dict and the
remote-code files travel as side files. NormHead normalizes ``lm_head`` rows
in every forward pass; normalizing them once on import makes Megatron-Core's
plain output layer compute the same logits; exporting the normalized rows
gives a Baichuan checkpoint with those same logits (NormHead normalizing them
again changes them by rounding only). Baichuan2-13B uses ALiBi, which
Megatron-Core's GPTModel does not implement, and is refused. So is
Baichuan-1 (same ``model_type``, a plain ``lm_head``; see ``families/__init__``)
and a tied-embedding Baichuan2: NormHead would normalize the shared embedding.
"""

from __future__ import annotations

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig
from tools.convert.families.base import Family, carried_keys, dtype_name, read_llama_like
from tools.convert.families.llama import O_PROJ, H, L, decoder
from tools.convert.mapping import Entry, NormHead, PackedQKV

W_PACK = PackedQKV(f"{L}self_attention.linear_qkv.weight", (f"{H}self_attn.W_pack.weight",))
NORM_HEAD = NormHead("output_layer.weight", ("lm_head.weight",))
ROTARY_BASE = 10000.0  # hard-coded in Baichuan2-7B's modeling code
BAICHUAN1_ARCHITECTURE = "BaiChuanForCausalLM"  # Baichuan-7B; Baichuan2 spells it BaichuanForCausalLM
TIED_REFUSED = (
    "a Baichuan2 model with tied embeddings is not supported: NormHead normalizes lm_head rows, "
    "which would also change the input embedding they share"
)


def table(cfg: ModelConfig) -> list[Entry]:
    return decoder(cfg, [W_PACK, O_PROJ], head=NORM_HEAD)


def read_config(config: dict) -> ModelConfig:
    if "max_position_embeddings" not in config:
        raise ConfigError(
            "this Baichuan config has no max_position_embeddings: it is the ALiBi variant (13B), "
            "which Megatron-Core's GPTModel does not implement"
        )
    if config.get("tie_word_embeddings"):
        raise ConfigError(TIED_REFUSED)
    return read_llama_like({**config, "num_key_value_heads": None, "rope_theta": ROTARY_BASE})


def write_config(cfg: ModelConfig, base: dict, dtype: torch.dtype) -> dict:
    scaled = cfg.use_rope_scaling or cfg.rotary_seq_len_interpolation_factor
    if cfg.groups != cfg.num_attention_heads or cfg.rotary_base != ROTARY_BASE or scaled:
        raise ConfigError("a Baichuan2 model has multi-head attention and rope base 10000 without scaling")
    if not cfg.untie_embeddings_and_output_weights:
        raise ConfigError(TIED_REFUSED)
    return {
        **carried_keys(base, "baichuan"),
        "architectures": ["BaichuanForCausalLM"],
        "model_type": "baichuan",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "initializer_range": cfg.init_method_std,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "torch_dtype": dtype_name(dtype),
    }


BAICHUAN2 = Family("baichuan2", "BaichuanForCausalLM", "baichuan", table, read_config, write_config)
