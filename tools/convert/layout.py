"""Megatron-Core's side of a conversion: parameter names and shapes, pipeline stages, layer specs.

Pure functions of a :class:`ModelConfig` and a TP/PP layout. The names are
those of megatron-core 0.16.1's ``GPTModel`` with the local layer spec; the
Transformer Engine spec differs only in the names :data:`TE_RENAMES` lists and
in carrying an ``_extra_state`` on every TE module (:func:`extra_state_keys`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.parallel import Layout, validate_layout
from megatron_patches.training.model import ModelConfig

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
SPECS = ("local", "te")

# Local spec name (layer-relative) -> Transformer Engine spec name: TE fuses the
# pre-attention and pre-MLP norms into the following linear layer.
TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LOCAL_EXTRA = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_TE_EXTRA = (*_LOCAL_EXTRA, "self_attention.core_attention")
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def layer_param(layer: int, suffix: str) -> str:
    return f"decoder.layers.{layer}.{suffix}"


def split_layer_name(name: str) -> tuple[int, str] | None:
    """``decoder.layers.7.mlp.linear_fc1.weight`` -> ``(7, "mlp.linear_fc1.weight")``."""
    match = _LAYER_KEY.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


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


def to_spec(local_name: str, spec: str) -> str:
    """A local-spec parameter name as ``spec`` names it."""
    if spec not in SPECS:
        raise ConfigError(f"--spec must be one of {SPECS}, got {spec!r}")
    layer = split_layer_name(local_name)
    if spec == "te" and layer and layer[1] in TE_RENAMES:
        return layer_param(layer[0], TE_RENAMES[layer[1]])
    return local_name


def from_spec(name: str) -> str | None:
    """Any spec's state-dict key -> local-spec name; None for ``_extra_state`` entries."""
    if name.endswith("._extra_state"):
        return None
    layer = split_layer_name(name)
    if layer:
        for local, te in TE_RENAMES.items():
            if layer[1] == te:
                return layer_param(layer[0], local)
    return name


def extra_state_keys(cfg: ModelConfig, layers: int, last_stage: bool, spec: str) -> dict[str, object]:
    """The non-tensor ``_extra_state`` entries a strict ``load_state_dict`` expects on one rank.

    Megatron-Core's own linear layers report ``None``; Transformer Engine
    modules without FP8 metadata report an empty uint8 tensor (TE 2.x).
    """
    te = spec == "te"
    modules = list(_TE_EXTRA if te else _LOCAL_EXTRA)
    if te and cfg.qk_layernorm:
        modules += ["self_attention.q_layernorm", "self_attention.k_layernorm"]
    value = (lambda: torch.empty(0, dtype=torch.uint8)) if te else (lambda: None)
    keys = {layer_param(i, f"{m}._extra_state"): value() for i in range(layers) for m in modules}
    if last_stage:
        if te:
            keys["decoder.final_layernorm._extra_state"] = value()
        keys["output_layer._extra_state"] = None  # GPTModel's output layer is Megatron's own in both specs
    return keys
