"""Which HF model families the lenses (tools/eval/inspect.py) can look into."""

from __future__ import annotations

from pathlib import Path

from megatron_patches.errors import ConfigError
from tools.hf_runtime.loading import declared_config

# Families the lenses work on: transformers' own modeling code with the
# model.model.layers / model.model.norm / lm_head layout and eager attention that returns weights.
SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
# Families the converter writes that the lenses refuse, and why.
UNSUPPORTED_FAMILIES = {
    "baichuan": "Baichuan2's modeling code ships with the checkpoint (trust_remote_code) and cannot "
    "return attention weights (its attention is scaled_dot_product_attention only); export it as "
    "llama with `python -m tools.convert hf2hf --hf DIR --out OUT --to llama` and inspect that",
}


def require_family(path: str | Path) -> None:
    """Refuse a model the lenses cannot look into, before anything is loaded."""
    family = declared_config(path)["model_type"]
    if family in UNSUPPORTED_FAMILIES:
        raise ConfigError(f"{path}: the lenses do not support {family!r}: {UNSUPPORTED_FAMILIES[family]}")
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"{path}: model family {family!r} is not supported; supported: {list(SUPPORTED_FAMILIES)}"
        )
