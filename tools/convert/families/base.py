"""What a model family is, and the HF ``config.json`` <-> :class:`ModelConfig` rules they share.

A :class:`Family` is a declarative mapping table plus the two config
translations. HF configs come in two styles: transformers < 5 keeps
``rope_theta``/``rope_scaling`` at the top level, transformers 5 nests them in
``rope_parameters``; both are read. Exported configs are produced by the
installed transformers' own config class, so they load with it, and also carry
the top-level keys transformers < 5 reads, so vLLM/SGLang/lm-eval stacks on
transformers 4.4x-4.5x load the same model.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig
from tools.convert import layout
from tools.convert.mapping import Entry, ZeroBias

# Megatron-Core 0.16.1's RotaryEmbedding._apply_scaling hard-codes these.
LLAMA3_ROPE_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Keys worth carrying from a source config of another family (hf2hf).
PORTABLE_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "attention_dropout")
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")
LEGACY_KEYS = ("rope_theta", "rope_scaling")  # rope_kwargs' keys, the ones transformers < 5 reads
_DTYPE_KEYS = ("torch_dtype", "dtype")
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # the HF class written on export
    model_type: str
    table: Callable[[ModelConfig], list[Entry]]
    read_config: Callable[[dict], ModelConfig]
    write_config: Callable[[ModelConfig, dict, torch.dtype], dict]

    def expand(self, cfg: ModelConfig) -> list[tuple[Entry, int | None]]:
        """The table over all layers, in model order; fails if it cannot hold every parameter of ``cfg``."""
        table = self.table(cfg)
        first = next(n for n, e in enumerate(table) if e.per_layer)
        layers = [e for e in table if e.per_layer]
        expanded = [(e, None) for e in table[:first] if not e.per_layer]
        for i, is_moe in enumerate(cfg.moe_layer_pattern()):
            expanded += [(e, i) for e in layer_entries(layers, cfg, bool(is_moe))]
        expanded += [(e, None) for e in table[first:] if not e.per_layer]
        held = [e.at(i)[0] for e, i in expanded if e.mcore]
        params = layout.canonical_shapes(cfg)
        missing = [name for name in params if name not in held]
        if missing:
            raise ConfigError(
                f"family {self.name} has no HF tensor for {missing[0]}: this model is no {self.architecture}"
            )
        extra = [name for name in held if name not in params]
        if extra:
            raise ConfigError(
                f"family {self.name} needs {extra[0]}, which this model lacks: it is no {self.architecture}"
            )
        return expanded

    def zero_biases(self, cfg: ModelConfig) -> list[ZeroBias]:
        return [e for e in self.table(cfg) if isinstance(e, ZeroBias)]


# Layer-relative prefixes of an MoE layer's MLP (Megatron-Core's MoELayer); a dense MLP's: "mlp.linear_fc".
MOE_MLP_PREFIXES = ("mlp.router.", "mlp.experts.", "mlp.shared_experts.")


def layer_entries(entries: list[Entry], cfg: ModelConfig, is_moe: bool) -> list[Entry]:
    """One layer's entries: the MLP entries of its kind (dense or MoE), routed-expert entries per expert."""
    out = []
    for entry in entries:
        suffix = entry.mcore.split(".{i}.", 1)[-1]
        if suffix.startswith("mlp.") and suffix.startswith(MOE_MLP_PREFIXES) != is_moe:
            continue
        out += [entry.for_expert(j) for j in range(cfg.num_moe_experts)] if entry.per_expert else [entry]
    return out


def require(config: dict, *keys: str) -> None:
    missing = [key for key in keys if key not in config]
    if missing:
        raise ConfigError(f"config.json lacks {', '.join(missing)}")


def rope_fields(config: dict) -> dict[str, Any]:
    """ModelConfig rope fields from either config style."""
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rotary_base": float(theta)}
    if kind == "linear":  # HF divides inv_freq by factor, Megatron-Core the positions: the same angles
        return {"rotary_base": float(theta), "rotary_seq_len_interpolation_factor": float(scaling["factor"])}
    if kind != "llama3":
        raise ConfigError(
            f"rope scaling type {kind!r} is not supported: Megatron-Core's GPTModel implements "
            "'linear' (seq_len_interpolation_factor) and Llama-3.1 ('llama3') scaling only"
        )
    for key, fixed in LLAMA3_ROPE_FIXED.items():
        if float(scaling.get(key, fixed)) != fixed:
            raise ConfigError(
                f"llama3 rope scaling with {key}={scaling[key]} is not supported: "
                f"Megatron-Core 0.16.1 hard-codes {key}={fixed:g}"
            )
    return {
        "rotary_base": float(theta),
        "use_rope_scaling": True,
        "rope_scaling_factor": float(scaling["factor"]),
    }


def rope_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Old-style rope kwargs; every transformers >= 4.56 config class accepts them."""
    if cfg.use_rope_scaling and cfg.rotary_seq_len_interpolation_factor:
        raise ConfigError("a model with both llama3 and linear rope scaling has no HF config")
    scaling = None
    if cfg.use_rope_scaling:
        scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **LLAMA3_ROPE_FIXED}
    elif cfg.rotary_seq_len_interpolation_factor:
        scaling = {"rope_type": "linear", "factor": cfg.rotary_seq_len_interpolation_factor}
    return {"rope_theta": cfg.rotary_base, "rope_scaling": scaling}


# HF config key -> (ModelConfig field, default when absent; None: required). One table, both directions.
CONFIG_FIELDS = {
    "num_hidden_layers": ("num_layers", None),
    "hidden_size": ("hidden_size", None),
    "intermediate_size": ("ffn_hidden_size", None),
    "num_attention_heads": ("num_attention_heads", None),
    "vocab_size": ("vocab_size", None),
    "max_position_embeddings": ("max_position_embeddings", 4096),
    "rms_norm_eps": ("norm_epsilon", 1e-6),
    "initializer_range": ("init_method_std", 0.02),
}


def refuse_sliding_window(config: dict, family: str) -> None:
    """Qwen's ``use_sliding_window`` changes attention, which Megatron-Core's GPTModel would not do."""
    if config.get("use_sliding_window"):
        raise ConfigError(
            f"{family} use_sliding_window=true is not supported (Megatron-Core has no sliding window here)"
        )


def read_llama_like(config: dict, **overrides: Any) -> ModelConfig:
    """The fields every Llama-style HF config shares."""
    require(config, *(key for key, (_, default) in CONFIG_FIELDS.items() if default is None))
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {config['hidden_act']!r} is not supported (needs 'silu' for SwiGLU)")
    if config.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported: add_bias_linear would also add attention biases")
    values = {field: config.get(key, default) for key, (field, default) in CONFIG_FIELDS.items()}
    heads = values["num_attention_heads"]
    head_dim = config.get("head_dim") or values["hidden_size"] // heads
    values.update(
        num_query_groups=config.get("num_key_value_heads") or heads,
        kv_channels=None if head_dim * heads == values["hidden_size"] else head_dim,
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        **rope_fields(config),
    )
    return ModelConfig(**(values | overrides))


def llama_like_fields(cfg: ModelConfig) -> dict[str, Any]:
    """Config fields of a Llama-style model; ``head_dim`` only where it is not hidden_size / heads."""
    fields = {key: getattr(cfg, field) for key, (field, _) in CONFIG_FIELDS.items()}
    fields.update(
        num_key_value_heads=cfg.groups,
        hidden_act="silu",
        tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
        **rope_kwargs(cfg),
    )
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        fields["head_dim"] = cfg.head_dim
    return fields


def carried_keys(base: dict, model_type: str) -> dict[str, Any]:
    """What of ``base`` survives into an exported config: all of it for its own family, else portable keys."""
    if base.get("model_type") == model_type:
        kept = dict(base)
    else:
        kept = {key: base[key] for key in PORTABLE_KEYS if key in base}
    # layer_types is derived from the layer count; transformers rebuilds it.
    for key in (*_ROPE_KEYS, *_DTYPE_KEYS, "layer_types", "transformers_version", "_name_or_path"):
        kept.pop(key, None)
    return kept


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPE_NAMES.items() if value == dtype)


def transformers_config(model_type: str, architecture: str, fields: dict, base: dict, dtype) -> dict:
    """``config.json`` content as the installed transformers writes it."""
    import transformers

    # transformers < 5 ignores rope_parameters and dtype: without its own keys, written from the same
    # values, 4.57 loads a rotary_base=500000 export with rope_theta=10000, a silently different model.
    # A deep copy: transformers 5 rewrites the rope_scaling dict it is given in place.
    legacy = copy.deepcopy({key: fields[key] for key in LEGACY_KEYS})
    values = {**carried_keys(base, model_type), **fields, "architectures": [architecture]}
    values["torch_dtype"] = dtype_name(dtype)
    values.pop("model_type", None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"transformers rejects the exported {model_type} config: {err}") from err
    return {**config.to_diff_dict(), **legacy, "torch_dtype": values["torch_dtype"]}


def warn(message: str) -> None:
    print(f"tools.convert: warning: {message}", file=sys.stderr)
