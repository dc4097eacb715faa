"""Model families: one declarative mapping table each, and how a checkpoint picks its family."""

from __future__ import annotations

from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig
from tools.convert.families.baichuan2 import BAICHUAN1_ARCHITECTURE, BAICHUAN2
from tools.convert.families.base import Family
from tools.convert.families.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from tools.convert.families.llama import LLAMA
from tools.convert.families.mistral import MISTRAL
from tools.convert.families.mixtral import MIXTRAL
from tools.convert.families.qwen2 import QWEN2
from tools.convert.families.qwen2_moe import QWEN2_MOE
from tools.convert.families.qwen3 import QWEN3
from tools.convert.families.qwen3_moe import QWEN3_MOE

_ALL = (LLAMA, MISTRAL, QWEN2, QWEN3, BAICHUAN2, MIXTRAL, QWEN2_MOE, QWEN3_MOE, DEEPSEEK_V2, DEEPSEEK_V3)
FAMILIES: dict[str, Family] = {f.name: f for f in _ALL}
# Architectures a family's model_type would claim, but whose weights mean something else.
REFUSED_ARCHITECTURES = {
    BAICHUAN1_ARCHITECTURE: (
        f"Baichuan-1 ({BAICHUAN1_ARCHITECTURE}) is not supported: its lm_head is a plain linear layer, "
        "and converting it as Baichuan2 would normalize its rows (its NormHead) and change the logits"
    ),
}
# model_types more than one generation of a model shares: only the architecture tells them apart.
AMBIGUOUS_MODEL_TYPES = {BAICHUAN2.model_type}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(config: dict) -> Family:
    """The family of an HF ``config.json``, by its architecture, else its model_type."""
    architectures = config.get("architectures") or []
    for architecture in architectures:
        if architecture in REFUSED_ARCHITECTURES:
            raise ConfigError(REFUSED_ARCHITECTURES[architecture])
    for family in FAMILIES.values():
        if family.architecture in architectures:
            return family
    model_type = config.get("model_type")
    if model_type in AMBIGUOUS_MODEL_TYPES:
        family = next(f for f in FAMILIES.values() if f.model_type == model_type)
        raise ConfigError(
            f"model_type {model_type!r} without architectures {[family.architecture]} is ambiguous "
            f"(architectures: {architectures}); only {family.architecture} ({family.name}) is supported"
        )
    for family in FAMILIES.values():
        if model_type == family.model_type:
            return family
    known = sorted(f.architecture for f in FAMILIES.values())
    raise ConfigError(
        f"unsupported architecture {architectures or config.get('model_type')!r}; supported: {known}"
    )


def default_family(cfg: ModelConfig) -> Family:
    """The HF family a Megatron-only checkpoint (trained from scratch) exports as."""
    if cfg.multi_latent_attention:
        return DEEPSEEK_V3 if cfg.moe_router_score_function == "sigmoid" else DEEPSEEK_V2
    if cfg.num_moe_experts:
        if cfg.moe_shared_expert_intermediate_size:
            return QWEN2_MOE
        return QWEN3_MOE if cfg.qk_layernorm else MIXTRAL
    if cfg.qk_layernorm:
        return QWEN3
    return QWEN2 if cfg.add_qkv_bias else LLAMA
