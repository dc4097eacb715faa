"""Megatron-Core's side of a conversion: parameter names and shapes, pipeline stages, layer specs.

Pure functions of a :class:`ModelConfig` and a TP/PP layout. The parameter
names of either layer spec belong to ``megatron_patches.formats.param_names``
(re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig
from megatron_patches.formats.param_names import (  # noqa: F401  (re-exported: the converter's names)
    EMBEDDING,
    FINAL_NORM,
    OUTPUT,
    SPECS,
    TE_RENAMES,
    extra_state_keys,
    from_spec,
    layer_param,
    split_layer_name,
    to_spec,
)
from megatron_patches.parallel import Layout, validate_layout


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the whole (TP=1, PP=1) model, vocabulary unpadded, in model order."""
    h, heads, groups, d = cfg.hidden_size, cfg.num_attention_heads, cfg.groups, cfg.head_dim
    qkv_rows = (heads + 2 * groups) * d
    fc1_rows = 2 * cfg.ffn_hidden_size if cfg.swiglu else cfg.ffn_hidden_size
    per_layer = {"input_layernorm.weight": (h,), "self_attention.linear_qkv.weight": (qkv_rows, h)}
    if cfg.add_qkv_bias:
        per_layer["self_attention.linear_qkv.bias"] = (qkv_rows,)
    if cfg.qk_layernorm:
        per_layer["self_attention.q_layernorm.weight"] = (d,)
        per_layer["self_attention.k_layernorm.weight"] = (d,)
    per_layer["self_attention.linear_proj.weight"] = (h, heads * d)
    per_layer["pre_mlp_layernorm.weight"] = (h,)
    per_layer["mlp.linear_fc1.weight"] = (fc1_rows, h)
    per_layer["mlp.linear_fc2.weight"] = (h, cfg.ffn_hidden_size)
    shapes = {EMBEDDING: (cfg.vocab_size, h)}
    for layer in range(cfg.num_layers):
        shapes.update({layer_param(layer, key): shape for key, shape in per_layer.items()})
    shapes[FINAL_NORM] = (h,)
    if cfg.untie_embeddings_and_output_weights:
        shapes[OUTPUT] = (cfg.vocab_size, h)
    return shapes


def check_supported(cfg: ModelConfig) -> None:
    """The architectures this converter maps: Llama-style RMSNorm + SwiGLU + RoPE, no linear biases."""
    unsupported = {
        "normalization": (cfg.normalization, "RMSNorm"),
        "swiglu": (cfg.swiglu, True),
        "add_bias_linear": (cfg.add_bias_linear, False),
        "position_embedding_type": (cfg.position_embedding_type, "rope"),
    }
    for name, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ConfigError(
                f"model config {name}={value!r} is not supported by tools.convert (needs {wanted!r})"
            )


def stage_layer_counts(
    num_layers: int, pp: int, first: int | None = None, last: int | None = None
) -> list[int]:
    """Layers per pipeline stage, Megatron-Core's rule for uneven first/last stages."""
    if pp < 1:
        raise ConfigError(f"PP must be >= 1, got {pp}")
    if first is None and last is None:
        if num_layers % pp:
            raise ConfigError(
                f"num_layers ({num_layers}) is not divisible by PP ({pp}); give "
                "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers for an uneven split"
            )
        return [num_layers // pp] * pp
    if pp == 1:
        raise ConfigError("uneven pipeline stages need PP > 1")
    middle = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    too_small = any(n is not None and n < 1 for n in (first, last))
    if too_small or rest < 0 or (middle == 0 and rest) or (middle and (rest % middle or rest < middle)):
        raise ConfigError(
            f"cannot place {num_layers} layers on {pp} stages with first={first} last={last}: "
            f"the {middle} remaining stages would share {rest} layers"
        )
    inner = [rest // middle] * middle if middle else []
    return [*([first] if first is not None else []), *inner, *([last] if last is not None else [])]


@dataclass(frozen=True)
class Pipeline:
    """Which global layers each pipeline stage owns."""

    counts: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.counts)

    def offset(self, stage: int) -> int:
        return sum(self.counts[:stage])

    def stage_of(self, layer: int) -> tuple[int, int]:
        """Global layer -> (stage, layer number local to that stage)."""
        for stage, count in enumerate(self.counts):
            if layer < count:
                return stage, layer
            layer -= count
        raise ConfigError(f"layer {layer + sum(self.counts)} is beyond the {sum(self.counts)} layers")


def plan_layout(
    cfg: ModelConfig, tp: int, pp: int, first: int | None = None, last: int | None = None
) -> Pipeline:
    """Validate a TP/PP layout for ``cfg`` (before anything is written) and return its pipeline."""
    check_supported(cfg)
    validate_layout(Layout(tp, tp, 1), cfg)
    return Pipeline(tuple(stage_layer_counts(cfg.num_layers, pp, first, last)))


def stage_params(names: list[str], pipeline: Pipeline, stage: int) -> list[tuple[str, str]]:
    """(global name, name local to ``stage``) of the canonical params that stage holds."""
    out = []
    last = pipeline.size - 1
    for name in names:
        layer = split_layer_name(name)
        if layer is not None:
            owner, local = pipeline.stage_of(layer[0])
            if owner == stage:
                out.append((name, layer_param(local, layer[1])))
        elif (name == EMBEDDING and stage == 0) or (name in (FINAL_NORM, OUTPUT) and stage == last):
            out.append((name, name))
    return out
