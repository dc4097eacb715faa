"""Gradient-accumulation fusion only where apex's kernel imports; the plan names the fused kernels."""

import importlib.util

import pytest

from megatron_patches.training import model
from megatron_patches.training.model import ModelConfig, describe_fused_kernels, fused_kernels


def _importable(monkeypatch, *names: str) -> None:
    """Make exactly ``names`` (of the GPU extras) look importable, whatever this machine has."""
    real = importlib.util.find_spec
    extras = ("transformer_engine", "fused_weight_gradient_mlp_cuda")

    def find_spec(name, *args, **kwargs):
        if name in extras:
            return object() if name in names else None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_transformer_engine_without_apex_builds_no_gradient_accumulation_fusion(monkeypatch, impl):
    # The README's "CUDA torch + pip Transformer Engine, no apex" route: Megatron's output layer
    # (a ColumnParallelLinear in either spec) refuses the fusion without apex's kernel.
    _importable(monkeypatch, "transformer_engine")
    cfg = ModelConfig(transformer_impl=impl)
    assert fused_kernels(cfg, on_gpu=True)["gradient_accumulation_fusion"] is False
    _importable(monkeypatch, "transformer_engine", "fused_weight_gradient_mlp_cuda")
    assert fused_kernels(cfg, on_gpu=True)["gradient_accumulation_fusion"] is True
    assert not any(fused_kernels(cfg, on_gpu=False).values())


def test_the_plan_names_the_fused_kernels(monkeypatch):
    _importable(monkeypatch, "transformer_engine")
    cfg = ModelConfig(transformer_impl="transformer_engine")
    monkeypatch.setattr(model.torch.cuda, "is_available", lambda: True)
    on = "bias_activation, bias_dropout, masked_softmax, persist_layer_norm, rope"  # no gradient_accumulation
    assert describe_fused_kernels(cfg) == f"fused kernels: {on}"
    monkeypatch.setattr(model.torch.cuda, "is_available", lambda: False)
    assert describe_fused_kernels(cfg) == "fused kernels: none (torch fallbacks)"
