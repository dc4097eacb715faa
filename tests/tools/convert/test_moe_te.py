"""Transformer Engine key names of MoE (and MLA) checkpoints: ``--spec te`` and ``--moe-grouped-gemm``.

TE is not installed on CPU, so the TE modules cannot be built. The names are proven instead by
(1) Megatron-Core's own TE layer specs (``get_gpt_decoder_layer_specs(use_transformer_engine=True)``,
built with stand-in TE classes) deciding which module owns each norm and how experts are grouped;
(2) every MoE family converting HF -> Megatron (TE names) -> HF bit-exactly, in both formats; and
(3) re-sharding a TE checkpoint to the local spec giving exactly the rank files of a direct conversion.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats import checkpoint as ckpt_format
from megatron_patches.formats import param_names
from tests.tools.convert import tiny
from tests.tools.convert.test_moe import _assert_same_rank_files
from tools.convert import commands, dist_stream, layout
from tools.convert.sources import HFSource

CASES = [*tiny.MOE_CASES, *tiny.DEEPSEEK_CASES]
_TE_CLASSES = (
    "TENorm",
    "TELayerNormColumnParallelLinear",
    "TEColumnParallelLinear",
    "TERowParallelLinear",
    "TELinear",
    "TEDotProductAttention",
    "TEColumnParallelGroupedLinear",
    "TERowParallelGroupedLinear",
)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_moe_te")
    return {case: tiny.save_hf(case, root / case, seed=60 + n) for n, case in enumerate(CASES)}


def _te_layer_specs(cfg, monkeypatch) -> list:
    """Megatron-Core's TE layer specs for ``cfg``, TE's classes replaced by stand-ins of the same names."""
    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_patches.training.model import transformer_config

    fakes = {name: type(name, (), {}) for name in _TE_CLASSES}
    for name, fake in fakes.items():
        monkeypatch.setattr(provider, name, fake)
    monkeypatch.setattr(provider, "is_te_min_version", lambda version: True)
    monkeypatch.setattr(gpt_layer_specs, "TENorm", fakes["TENorm"], raising=False)
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider, raising=False)
    config = transformer_config(cfg, use_cpu_initialization=True)
    return gpt_layer_specs.get_gpt_decoder_layer_specs(config, use_transformer_engine=True)


def _te_norm_and_expert_params(spec, local_experts: int, path: str = "") -> set[str]:
    """The norm weights and grouped expert weights TE modules of a layer spec hold (TE's own names:
    ``te.pytorch.RMSNorm.weight``, ``LayerNormLinear.layer_norm_weight``, ``GroupedLinear.weight<i>``)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    module = spec.module if isinstance(spec, ModuleSpec) else spec
    owned = {
        "TENorm": [f"{path}weight"],
        "TELayerNormColumnParallelLinear": [f"{path}layer_norm_weight"],
        "TEColumnParallelGroupedLinear": [f"{path}weight{i}" for i in range(local_experts)],
        "TERowParallelGroupedLinear": [f"{path}weight{i}" for i in range(local_experts)],
    }.get(module.__name__, [])
    params = set(owned)
    submodules = spec.submodules if isinstance(spec, ModuleSpec) else None
    if submodules is not None and dataclasses.is_dataclass(submodules):
        for field in dataclasses.fields(submodules):
            child = getattr(submodules, field.name)
            if isinstance(child, ModuleSpec | type):
                params |= _te_norm_and_expert_params(child, local_experts, f"{path}{field.name}.")
    return params


@pytest.mark.parametrize("case", ["qwen2_moe", "deepseek_v3"])
def test_te_names_are_those_of_megatron_cores_te_layer_specs(case, hf_dirs, monkeypatch):
    cfg = dataclasses.replace(HFSource(hf_dirs[case]).cfg, moe_grouped_gemm=True)
    specs = _te_layer_specs(cfg, monkeypatch)
    names = layout.canonical_shapes(cfg)
    experts = cfg.num_moe_experts
    for layer, spec in enumerate(specs):
        expected = _te_norm_and_expert_params(spec, experts)
        ours = {
            param
            for name in names
            if (split := layout.split_layer_name(name)) and split[0] == layer
            for param in [layout.split_layer_name(layout.spec_name(name, "te", cfg, grouped=True))[1]]
            if param.endswith(("norm_weight", "norm.weight")) or ".experts.linear_fc" in param
        }
        assert ours == expected, layer
        # TE specs map no norm in sharded_state_dict: a torch_dist key is the state-dict name.
        assert not any("norm" in key for key in spec.submodules.sharded_state_dict_keys_map)


@pytest.mark.parametrize("case", CASES)
def test_every_te_name_maps_back_to_its_local_name(case, hf_dirs):
    cfg = HFSource(hf_dirs[case]).cfg
    for grouped in (False, True):
        renamed = {
            name: layout.spec_name(name, "te", cfg, grouped=grouped) for name in layout.canonical_shapes(cfg)
        }
        assert len(set(renamed.values())) == len(renamed)
        assert all(layout.from_spec(te) == local for local, te in renamed.items())
    moe_layer = cfg.moe_layer_pattern().index(1)
    assert layout.spec_name(f"decoder.layers.{moe_layer}.pre_mlp_layernorm.weight", "te", cfg) == (
        f"decoder.layers.{moe_layer}.pre_mlp_layernorm.weight"  # an MoE layer keeps its own TENorm
    )
    expert = f"decoder.layers.{moe_layer}.mlp.experts.local_experts.2.linear_fc2.weight"
    assert (
        layout.spec_name(expert, "te", cfg, grouped=True)
        == f"decoder.layers.{moe_layer}.mlp.experts.linear_fc2.weight2"
    )
    with pytest.raises(ConfigError, match="legacy GroupedMLP layout .* is not supported"):
        layout.from_spec(f"decoder.layers.{moe_layer}.mlp.experts.weight1")


@pytest.mark.parametrize("case", CASES)
def test_hf_to_te_mcore_to_hf_is_bit_exact_in_both_formats(case, hf_dirs, tmp_path):
    hf = hf_dirs[case]
    grouped = case != "mixtral"  # Mixtral: TE's SequentialMLP names; the others: TEGroupedMLP's
    pp = 1 if case in tiny.DEEPSEEK_CASES else 2  # DeepSeek's tiny models have 3 layers
    commands.hf2mcore(hf, tmp_path / "te", tp=2, pp=pp, ep=2, spec="te", moe_grouped_gemm=grouped, quiet=True)
    state = ckpt_format.load_rank(tmp_path / "te" / "release", 1, pp - 1, pp, ep_rank=1, ep_size=2)
    assert ckpt_format.model_config_of(state, tmp_path).moe_grouped_gemm == grouped  # what the trainer builds
    rank = state["model"]
    expert_key = (
        ".mlp.experts.linear_fc1.weight0" if grouped else ".mlp.experts.local_experts.0.linear_fc1.weight"
    )
    assert any(name.endswith(expert_key) for name in rank)
    assert any(name.endswith(".pre_mlp_layernorm.weight") for name in rank)
    assert isinstance(rank["decoder.final_layernorm._extra_state"], torch.Tensor)  # a TE module's
    commands.mcore2hf(tmp_path / "te", tmp_path / "hf", quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(hf), tiny.hf_tensors(tmp_path / "hf"))

    # TE -> local re-shard equals converting straight to local.
    commands.mcore2mcore(tmp_path / "te", tmp_path / "local", tp=2, ep=2, quiet=True)
    commands.hf2mcore(hf, tmp_path / "direct", tp=2, ep=2, quiet=True)
    _assert_same_rank_files(tmp_path / "direct", tmp_path / "local")

    commands.hf2mcore(hf, tmp_path / "dist", fmt="torch_dist", spec="te", quiet=True)
    commands.mcore2hf(tmp_path / "dist", tmp_path / "hf_dist", quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(hf), tiny.hf_tensors(tmp_path / "hf_dist"))


def test_torch_dist_keys_follow_the_spec_of_each_layer(hf_dirs, tmp_path):
    # Qwen2-MoE: layer 0 dense, 1-3 MoE. The local spec's keys map renames pre_mlp_layernorm in every
    # layer; the TE spec fuses it only in dense layers and saves an MoE layer's TENorm under its own name.
    cfg = HFSource(hf_dirs["qwen2_moe"]).cfg
    local, te = (
        "decoder.layers.{}.pre_mlp_layernorm.weight",
        "decoder.layers.{}.mlp.linear_fc1.layer_norm_weight",
    )
    for layer, spec_key in ((0, te), (1, local)):
        name = local.format(layer)
        stored = dist_stream._stored_key(name, cfg.num_layers, 12, te_name=layout.spec_name(name, "te", cfg))
        assert stored[0] == spec_key.format(layer)
        assert dist_stream._stored_key(name, cfg.num_layers, 12)[0] == te.format(layer)


@pytest.mark.parametrize(
    ("case", "target", "message"),
    [
        ("qwen2", dict(moe_grouped_gemm=True, spec="te"), "--moe-grouped-gemm needs an MoE model"),
        ("qwen2", dict(fmt="torch_dist", spec="te"), "--spec applies to --format torch"),
    ],
)
def test_unmapped_layouts_are_refused_in_one_line(case, target, message, tmp_path):
    source = tiny.save_hf(case, tmp_path / case, seed=1)
    with pytest.raises(ConfigError, match=message):
        commands.hf2mcore(source, tmp_path / "out", quiet=True, **target)
    assert not (tmp_path / "out").exists()


def test_te_extra_state_keys_cover_every_te_module():
    names = [
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.pre_mlp_layernorm.weight",
        "decoder.layers.0.mlp.router.weight",
        "decoder.layers.0.mlp.experts.linear_fc1.weight0",
        "decoder.layers.0.mlp.experts.linear_fc1.weight1",
        "decoder.layers.0.mlp.shared_experts.gate_weight",
        "embedding.word_embeddings.weight",
        "output_layer.weight",
    ]
    keys = param_names._te_extra_state_keys(names, last_stage=True)
    assert set(keys) == {
        "decoder.layers.0.self_attention.linear_qkv._extra_state",
        "decoder.layers.0.self_attention.core_attention._extra_state",
        "decoder.layers.0.pre_mlp_layernorm._extra_state",
        "decoder.layers.0.mlp.experts.linear_fc1._extra_state",  # one per GroupedLinear
        "output_layer._extra_state",
    }
