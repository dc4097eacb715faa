"""Megatron-LM's ``args`` namespace <-> :class:`ModelConfig`: read its checkpoints, write ours for it.

Megatron-LM's ``save_checkpoint`` stores the run's whole ``argparse.Namespace``
as ``args`` (in every legacy rank file, and in a ``torch_dist`` checkpoint's
``common.pt``); ``--use-checkpoint-args`` rebuilds the model from it. This
module derives the architecture from such a namespace (or from a file holding
a Megatron-LM argument list or a YAML of ModelConfig fields, for checkpoints
without ``args``), and builds the namespace this project stores beside its own
``model_config``. Pure: no Megatron import, no I/O beyond reading that file.

Public API: :func:`model_config_from_args`, :func:`megatron_lm_args`, :func:`read_model_config_file`.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from megatron_patches.config_io import read_yaml
from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import MLA_FIELDS, ModelConfig

ARGS = "args"  # the common-state / rank-file key Megatron-LM stores its namespace under
# Megatron-LM's defaults for what an argument list may leave out (arguments.py, pretrain_gpt.py).
_DEFAULTS: dict[str, Any] = {
    "group_query_attention": False,
    "num_query_groups": 1,
    "kv_channels": None,
    "make_vocab_size_divisible_by": 128,
    "position_embedding_type": "learned_absolute",
    "rotary_base": 10000,
    "rotary_percent": 1.0,
    "use_rope_scaling": False,
    "rope_scaling_factor": 8.0,
    "rotary_seq_len_interpolation_factor": None,
    "normalization": "LayerNorm",
    "norm_epsilon": 1e-5,
    "swiglu": False,
    "add_qkv_bias": False,
    "add_bias_linear": True,
    "qk_layernorm": False,
    "untie_embeddings_and_output_weights": False,
    "init_method_std": 0.02,
    "hidden_dropout": 0.1,
    "attention_dropout": 0.1,
    "transformer_impl": "transformer_engine",
}
_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads")
# Argument-list switches whose attribute is the opposite of the flag's name.
_NEGATIVE_FLAGS = {"disable_bias_linear": "add_bias_linear"}
SUPPLY = "--model-config FILE (converter) or checkpoint.pretrained_model_config (trainer)"
# MoE: Megatron-LM's argument names are ModelConfig's (moe_*), except num_experts (num_moe_experts).
MOE_FIELDS = tuple(name for name in ModelConfig.__dataclass_fields__ if name.startswith("moe_"))
# Multi-Latent Attention: Megatron-LM's names are ModelConfig's (MLATransformerConfig's); written when on.
MLA_ARGS = ("multi_latent_attention", *MLA_FIELDS)


def model_config_from_args(args: argparse.Namespace | dict[str, Any], where: str | Path) -> ModelConfig:
    """The architecture of a Megatron-LM run, from its ``args`` (a Namespace, or a dict of its attributes).

    The vocabulary is the padded embedding's (``padded_vocab_size``): the
    tokenizer's own size is not among Megatron-LM's args.
    """
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    values = {**_DEFAULTS, **{k: v for k, v in given.items() if v is not None or k not in _DEFAULTS}}
    if given.get("use_rotary_position_embeddings") and given.get("position_embedding_type") is None:
        values["position_embedding_type"] = "rope"  # Megatron-LM's older switch for RoPE
    missing = [name for name in _REQUIRED if values.get(name) is None]
    vocab = values.get("padded_vocab_size") or values.get("vocab_size")
    if missing or vocab is None:
        name = missing[0] if missing else "padded_vocab_size"
        raise ConfigError(f"{where}: Megatron-LM args lack {name}; give the architecture with {SUPPLY}")
    return _to_model_config(values, int(vocab))


def _to_model_config(values: dict[str, Any], vocab: int) -> ModelConfig:
    hidden, heads = int(values["hidden_size"]), int(values["num_attention_heads"])
    kv_channels = values["kv_channels"]
    groups = int(values["num_query_groups"]) if values["group_query_attention"] else None
    ffn = values.get("ffn_hidden_size") or (4 * hidden)
    impl = values["transformer_impl"]
    return ModelConfig(
        num_layers=int(values["num_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(ffn),
        num_attention_heads=heads,
        num_query_groups=None if groups == heads else groups,
        kv_channels=None if kv_channels in (None, hidden // heads) else int(kv_channels),
        vocab_size=vocab,
        make_vocab_size_divisible_by=int(values["make_vocab_size_divisible_by"]),
        max_position_embeddings=int(values.get("max_position_embeddings") or values.get("seq_length", 4096)),
        position_embedding_type=str(values["position_embedding_type"]),
        rotary_base=float(values["rotary_base"]),
        rotary_percent=float(values["rotary_percent"]),
        use_rope_scaling=bool(values["use_rope_scaling"]),
        rope_scaling_factor=float(values["rope_scaling_factor"]),
        rotary_seq_len_interpolation_factor=values["rotary_seq_len_interpolation_factor"],
        normalization=str(values["normalization"]),
        norm_epsilon=float(values["norm_epsilon"]),
        swiglu=bool(values["swiglu"]),
        add_qkv_bias=bool(values["add_qkv_bias"]),
        add_bias_linear=bool(values["add_bias_linear"]),
        qk_layernorm=bool(values["qk_layernorm"]),
        untie_embeddings_and_output_weights=bool(values["untie_embeddings_and_output_weights"]),
        init_method_std=float(values["init_method_std"]),
        hidden_dropout=float(values["hidden_dropout"]),
        attention_dropout=float(values["attention_dropout"]),
        transformer_impl=impl if impl in ("local", "transformer_engine") else "local",
        **_moe_fields(values),
        **_mla_fields(values),
    )


def _mla_fields(values: dict[str, Any]) -> dict[str, Any]:
    """The MLA part of a Megatron-LM namespace (none without ``multi_latent_attention``)."""
    if not values.get("multi_latent_attention"):
        return {}
    return {name: values[name] for name in MLA_ARGS if name in values}


def _moe_fields(values: dict[str, Any]) -> dict[str, Any]:
    """The MoE part of a Megatron-LM namespace (none for a dense run: ``num_experts`` None)."""
    if values.get("num_experts") is None:
        return {}
    given = {name: values[name] for name in MOE_FIELDS if values.get(name) is not None}
    return {"num_moe_experts": int(values["num_experts"]), **given}


def megatron_lm_args(cfg: ModelConfig, tp: int, pp: int, vpp: int | None = None) -> argparse.Namespace:
    """The namespace Megatron-LM's ``--use-checkpoint-args`` reads, for a checkpoint of ``cfg`` at TP x PP
    (x VPP model chunks per PP rank, whose legacy rank files hold ``model0``, ``model1``, ...)."""
    return argparse.Namespace(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.num_query_groups is not None,
        num_query_groups=cfg.groups,
        kv_channels=cfg.head_dim,
        seq_length=cfg.max_position_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        position_embedding_type=cfg.position_embedding_type,
        add_position_embedding=cfg.position_embedding_type == "learned_absolute",
        use_rotary_position_embeddings=cfg.position_embedding_type == "rope",
        rotary_base=cfg.rotary_base,
        rotary_percent=cfg.rotary_percent,
        rotary_interleaved=False,
        use_rope_scaling=cfg.use_rope_scaling,
        rope_scaling_factor=cfg.rope_scaling_factor,
        rotary_seq_len_interpolation_factor=cfg.rotary_seq_len_interpolation_factor,
        normalization=cfg.normalization,
        norm_epsilon=cfg.norm_epsilon,
        apply_layernorm_1p=False,
        swiglu=cfg.swiglu,
        squared_relu=False,
        add_qkv_bias=cfg.add_qkv_bias,
        add_bias_linear=cfg.add_bias_linear,
        qk_layernorm=cfg.qk_layernorm,
        untie_embeddings_and_output_weights=cfg.untie_embeddings_and_output_weights,
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
        padded_vocab_size=cfg.padded_vocab_size(tp),
        init_method_std=cfg.init_method_std,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        transformer_impl="transformer_engine" if cfg.transformer_impl == "transformer_engine" else "local",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        num_experts=cfg.num_moe_experts,
        **{name: getattr(cfg, name) for name in MOE_FIELDS},
        **{name: getattr(cfg, name) for name in MLA_ARGS if cfg.multi_latent_attention},
    )


def read_model_config_file(path: str | Path) -> ModelConfig:
    """A model config given by hand: a YAML of ModelConfig fields, or a Megatron-LM argument list."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        config = ModelConfig.from_dict(read_yaml(path))
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"--model-config file not found: {path}") from None
        config = model_config_from_args(_parse_argument_list(text, path), path)
    config.validate()
    return config


def _parse_argument_list(text: str, where: Path) -> dict[str, Any]:
    """``--num-layers 32 --swiglu ...`` (newlines, backslashes and ``#`` comments allowed) as attributes."""
    try:
        tokens = shlex.split(text.replace("\\\n", " "), comments=True)
    except ValueError as err:
        raise ConfigError(f"{where}: cannot split the argument list: {err}") from None
    values: dict[str, Any] = {}
    for index, token in enumerate(tokens):
        if not token.startswith("--"):
            if index == 0 or not tokens[index - 1].startswith("--"):
                raise ConfigError(f"{where}: {token!r} follows no --flag")
            continue
        name = token[2:].replace("-", "_")
        following = tokens[index + 1] if index + 1 < len(tokens) else "--"
        if following.startswith("--"):
            values[_NEGATIVE_FLAGS.get(name, name)] = name not in _NEGATIVE_FLAGS
        else:
            values[name] = _number_or_text(following)
    return values


def _number_or_text(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
