"""Loading an HF export (model + tokenizer) for evaluation, with one-line errors."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_patches.errors import ConfigError

# Families whose module layout (model.model.layers, model.model.norm, lm_head) the lenses
# rely on: the decoder-only families the converter writes.
SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_type(path: str | Path) -> str:
    """The ``model_type`` of an HF directory (raises on a missing/unreadable config)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not an HF model directory (no config.json)")
    return AutoConfig.from_pretrained(path).model_type


def require_family(path: str | Path) -> None:
    family = model_type(path)
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"{path}: model family {family!r} is not supported; supported: {list(SUPPORTED_FAMILIES)}"
        )


def load_model(
    path: str | Path,
    dtype: str = "float32",
    device: str | None = None,
    attn_implementation: str | None = None,
):
    """``AutoModelForCausalLM`` in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    model_type(path)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    kwargs = {"dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as err:  # e.g. a config class with no causal-LM head
        raise ConfigError(f"{path}: not loadable as a causal LM: {str(err).splitlines()[0]}") from None
    return model.to(device or default_device()).eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"tokenizer directory {path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_device(model) -> torch.device:
    return next(model.parameters()).device
