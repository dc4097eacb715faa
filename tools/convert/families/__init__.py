"""Model families: one declarative mapping table each, and how a checkpoint picks its family."""

from __future__ import annotations

from megatron_patches.errors import ConfigError
from megatron_patches.training.model import ModelConfig
from tools.convert.families.baichuan2 import BAICHUAN2
from tools.convert.families.base import Family
from tools.convert.families.llama import LLAMA
from tools.convert.families.mistral import MISTRAL
from tools.convert.families.qwen2 import QWEN2
from tools.convert.families.qwen3 import QWEN3

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, BAICHUAN2)}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(config: dict) -> Family:
    """The family of an HF ``config.json``, by its architecture, else its model_type."""
    architectures = config.get("architectures") or []
    for family in FAMILIES.values():
        if family.architecture in architectures:
            return family
    for family in FAMILIES.values():
        if config.get("model_type") == family.model_type:
            return family
    known = sorted(f.architecture for f in FAMILIES.values())
    raise ConfigError(
        f"unsupported architecture {architectures or config.get('model_type')!r}; supported: {known}"
    )


def default_family(cfg: ModelConfig) -> Family:
    """The HF family a Megatron-only checkpoint (trained from scratch) exports as."""
    if cfg.qk_layernorm:
        return QWEN3
    return QWEN2 if cfg.add_qkv_bias else LLAMA
