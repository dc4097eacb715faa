"""Megatron-Core ``GPTModel`` state-dict names as checkpoints store them, for either layer spec.

The names are those of megatron-core 0.16.1's ``GPTModel`` with the local
layer spec; the Transformer Engine spec differs only in the names
:data:`TE_RENAMES` lists and in carrying an ``_extra_state`` on every TE module
(:func:`extra_state_keys`). The converter (``tools.convert.layout``) and the
trainer's legacy-release loader (``formats.checkpoint.load_model_for_rank``)
share them; nothing here imports Megatron-Core.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig

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
# The Transformer Engine spec of an MoE layer
# (``gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec`` with ``num_experts``; ``moe_module_specs``
# sets ``fuse_pre_mlp_layernorm: False``) keeps ``pre_mlp_layernorm`` a TENorm of its own: only dense
# layers fuse it into ``mlp.linear_fc1``. Under Multi-Latent Attention the same function keeps
# ``input_layernorm`` a TENorm and fuses the q / kv norms into the up projections
# (TELayerNormColumnParallelLinear).
MLA_TE_RENAMES = {
    "self_attention.q_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
    "self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
}
# TEGroupedMLP (TE spec with moe_grouped_gemm): te.pytorch.GroupedLinear, as Megatron-Core's
# TEColumnParallelGroupedLinear / TERowParallelGroupedLinear wrap it, holds local expert i as ``weight<i>``
# (same per-TP-rank layout as SequentialMLP's ``local_experts.<i>.linear_fc<n>.weight``) and one
# ``_extra_state`` per linear.
_GROUPED_KEY = re.compile(r"^(.+\.mlp\.experts\.)(linear_fc[12])\.weight(\d+)$")
# Megatron-Core's legacy GroupedMLP (experts.py): all local experts in two transposed parameters.
_LEGACY_GROUPED = (".mlp.experts.weight1", ".mlp.experts.weight2")
_LOCAL_EXTRA = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_TE_EXTRA = (*_LOCAL_EXTRA, "self_attention.core_attention")
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# A routed expert's parameter (Megatron-Core's SequentialMLP, local spec); numbered within its EP rank.
_EXPERT_KEY = re.compile(r"^(.+\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")
# Modules with a weight that are Megatron-Core's own in the TE spec too (no TE ``_extra_state``).
_NOT_TE = ("embedding.word_embeddings", "output_layer", ".mlp.router")
# Modules whose weight marks a Megatron-Core linear layer, each with an ``_extra_state`` (None, local spec).
_LINEAR_WEIGHTS = (".linear_qkv.weight", ".linear_proj.weight", ".linear_fc1.weight", ".linear_fc2.weight")


def layer_param(layer: int, suffix: str) -> str:
    return f"decoder.layers.{layer}.{suffix}"


def split_layer_name(name: str) -> tuple[int, str] | None:
    """``decoder.layers.7.mlp.linear_fc1.weight`` -> ``(7, "mlp.linear_fc1.weight")``."""
    match = _LAYER_KEY.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def split_expert_name(name: str) -> tuple[str, int, str] | None:
    """``...local_experts.3.linear_fc1.weight`` -> ``("...local_experts.", 3, ".linear_fc1.weight")``."""
    match = _EXPERT_KEY.match(name)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def renumber_expert(name: str, expert: int) -> str:
    """``name`` (an expert parameter) for expert number ``expert``."""
    prefix, _, suffix = split_expert_name(name)
    return f"{prefix}{expert}{suffix}"


def to_spec(local_name: str, spec: str) -> str:
    """A local-spec parameter name as ``spec`` names it."""
    if spec not in SPECS:
        raise ConfigError(f"--spec must be one of {SPECS}, got {spec!r}")
    layer = split_layer_name(local_name)
    if spec == "te" and layer and layer[1] in TE_RENAMES:
        return layer_param(layer[0], TE_RENAMES[layer[1]])
    return local_name


def spec_name(
    local_name: str, spec: str, cfg: ModelConfig, first_layer: int = 0, grouped: bool = False
) -> str:
    """``local_name`` as ``spec`` names it in a model of any kind (MoE, MLA); its layer number counts from
    global layer ``first_layer`` (a pipeline stage's first). ``grouped``: TEGroupedMLP's expert names."""
    if spec != "te" or not (cfg.num_moe_experts or cfg.multi_latent_attention):
        return to_spec(local_name, spec)
    layer = split_layer_name(local_name)
    if layer is None:
        return local_name
    number, param = layer
    if param == "pre_mlp_layernorm.weight":
        moe = cfg.moe_layer_pattern()[first_layer + number]
        return local_name if moe else layer_param(number, TE_RENAMES[param])
    renames = MLA_TE_RENAMES if cfg.multi_latent_attention else TE_RENAMES
    if param in renames:
        return layer_param(number, renames[param])
    expert = split_expert_name(local_name)
    if grouped and expert:
        prefix, index, suffix = expert  # ".linear_fc1.weight" -> "linear_fc1.weight<index>"
        return f"{prefix.removesuffix('local_experts.')}{suffix[1:]}{index}"
    return local_name


def from_spec(name: str) -> str | None:
    """Any spec's state-dict key -> local-spec name; None for ``_extra_state`` entries."""
    if name.endswith("._extra_state"):
        return None
    if name.endswith(_LEGACY_GROUPED):
        raise ConfigError(
            f"{name}: the legacy GroupedMLP layout (moe_use_legacy_grouped_gemm, experts concatenated in "
            "weight1/weight2) is not supported; save with TE's grouped GEMM or SequentialMLP"
        )
    if grouped := _GROUPED_KEY.match(name):
        return f"{grouped[1]}local_experts.{grouped[3]}.{grouped[2]}.weight"
    layer = split_layer_name(name)
    if layer:
        for local, te in (*TE_RENAMES.items(), *MLA_TE_RENAMES.items()):
            if layer[1] == te:
                return layer_param(layer[0], local)
    return name


def extra_state_keys(
    cfg: ModelConfig, layers: int, last_stage: bool, spec: str, params: Iterable[str] = ()
) -> dict[str, object]:
    """The non-tensor ``_extra_state`` entries a strict ``load_state_dict`` expects on one rank.

    An MoE model's layers differ (dense or MoE, and which experts the rank holds), so its entries
    are derived from the rank's parameter names ``params`` (local spec).

    Megatron-Core's own linear layers report ``None``; Transformer Engine
    modules without FP8 metadata report an empty uint8 tensor (TE 2.x).
    """
    te = spec == "te"
    if te and (cfg.num_moe_experts or cfg.multi_latent_attention):
        return _te_extra_state_keys(params, last_stage)
    if cfg.num_moe_experts:
        return _moe_extra_state_keys(params, last_stage)
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


def _te_extra_state_keys(params: Iterable[str], last_stage: bool) -> dict[str, object]:
    """TE spec, from the rank's TE-named ``params``: every module owning a ``weight`` / ``weight<i>`` /
    ``layer_norm_weight`` is a TE module (linears, TENorms, GroupedLinear: one each), as is each layer's
    ``core_attention`` (TEDotProductAttention); the embedding, the router and the output layer are
    Megatron-Core's own."""
    modules, layers = set(), set()
    for name in params:
        module, _, leaf = name.rpartition(".")
        if leaf.rstrip("0123456789") in ("weight", "layer_norm_weight") and not module.endswith(_NOT_TE):
            modules.add(module)
        if layer := split_layer_name(name):
            layers.add(layer[0])
    modules.update(layer_param(layer, "self_attention.core_attention") for layer in layers)
    keys: dict[str, object] = {
        f"{m}._extra_state": torch.empty(0, dtype=torch.uint8) for m in sorted(modules)
    }
    if last_stage:
        keys["output_layer._extra_state"] = None
    return keys


def _moe_extra_state_keys(params: Iterable[str], last_stage: bool) -> dict[str, object]:
    """Local spec: every Megatron-Core linear layer (routed and shared experts included) reports None."""
    keys = {
        name[: -len("weight")] + "_extra_state": None for name in params if name.endswith(_LINEAR_WEIGHTS)
    }
    if last_stage:
        keys["output_layer._extra_state"] = None
    return keys
