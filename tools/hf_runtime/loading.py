"""Loading an HF export (model + tokenizer) for evaluation and inference, with one-line errors."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_patches.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def declared_config(path: str | Path) -> dict:
    """The raw ``config.json`` of an HF directory, read without transformers."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{path} is not an HF model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(f"{config_file} has no 'model_type' string")
    return config


def load_config(path: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """``AutoConfig`` of an HF directory; unknown families and unconsented remote code are ConfigErrors."""
    from transformers import AutoConfig

    declared = declared_config(path)
    family = declared["model_type"]
    _require_consent(declared, f"{path}: model family {family!r}", trust_remote_code)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as err:
        if "does not recognize this architecture" in str(err):
            raise ConfigError(
                f"{path}: unknown model family {family!r} (not in this transformers install, "
                "and config.json has no auto_map to remote code)"
            ) from None
        raise ConfigError(f"{path}: cannot read the model config: {str(err).splitlines()[0]}") from None


def _require_consent(config: dict, what: str, trust_remote_code: bool) -> None:
    """Refuse remote code without --trust-remote-code here: transformers would prompt on a terminal."""
    if "auto_map" in config and not trust_remote_code:
        raise ConfigError(
            f"{what} ships its own modeling code; pass --trust-remote-code to run it "
            "(only for exports you trust)"
        )


def model_type(path: str | Path, trust_remote_code: bool = False) -> str:
    """The ``model_type`` of an HF directory transformers can load (ConfigError otherwise)."""
    return load_config(path, trust_remote_code).model_type


def load_model(
    path: str | Path,
    dtype: str = "float32",
    device: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """``AutoModelForCausalLM`` in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    load_config(path, trust_remote_code)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as err:  # e.g. a config class with no causal-LM head
        raise ConfigError(f"{path}: not loadable as a causal LM: {str(err).splitlines()[0]}") from None
    return model.to(device or default_device()).eval()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` with a pad token (the EOS token when it has none) for batched generation."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"tokenizer directory {path} does not exist")
    _require_consent(_tokenizer_config(Path(path)), f"{path}: the tokenizer", trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{path}: cannot load the tokenizer: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_config(path: Path) -> dict:
    """``tokenizer_config.json`` ({} when absent or unreadable: transformers then names the problem)."""
    with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        return config if isinstance(config, dict) else {}
    return {}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
