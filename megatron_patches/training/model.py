"""Llama-style Megatron-Core ``GPTModel`` from a small typed config.

The config itself (``ModelConfig``, Megatron-LM's argument names) lives in
``megatron_patches.formats.model_config`` so that it imports without Megatron-Core;
this module builds the model from it and checks the pinned API at import.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import TYPE_CHECKING, Any

import torch

from megatron_patches import cpu
from megatron_patches.compat import require_signature
from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig

if TYPE_CHECKING:  # annotations only; the functions import what they use from Megatron-Core
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import ModuleSpec


def _check_pinned_api() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    require_signature(LanguageModule.compute_language_model_loss, ["self", "labels", "logits"])


_check_pinned_api()


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def transformer_engine_usable() -> bool:
    """CUDA is present and ``transformer_engine.pytorch`` imports (a build for another torch may not)."""
    if not (torch.cuda.is_available() and transformer_engine_available()):
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a mismatched TE build fails with assorted errors
        return False
    return True


def resolve_transformer_impl(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``transformer_impl: auto`` replaced by the spec this machine runs."""
    if cfg.transformer_impl != "auto":
        return cfg
    impl = "transformer_engine" if transformer_engine_usable() else "local"
    return dataclasses.replace(cfg, transformer_impl=impl)


def transformer_config(
    cfg: ModelConfig,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> TransformerConfig:
    """The Megatron-Core ``TransformerConfig`` for ``cfg`` at a TP/PP layout."""
    from megatron.core.transformer import TransformerConfig

    values = dict(
        **_architecture_fields(cfg),
        **fused_kernels(cfg),
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        sequence_parallel=False,  # the trainer passes parallel.sequence_parallel
    )
    values.update(overrides)
    return TransformerConfig(**values)


def _architecture_fields(cfg: ModelConfig) -> dict[str, Any]:
    """``TransformerConfig`` fields that decide the weights (Megatron-LM's argument names mostly)."""
    return dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.groups,
        kv_channels=cfg.head_dim,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=cfg.swiglu,
        activation_func=torch.nn.functional.silu if cfg.swiglu else torch.nn.functional.gelu,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        init_method_std=cfg.init_method_std,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
    )


def gradient_accumulation_fusion_available() -> bool:
    """Apex's ``fused_weight_gradient_mlp_cuda`` imports: Megatron-Core's ``ColumnParallelLinear``
    (the output layer in either spec) refuses ``gradient_accumulation_fusion`` without it, even
    where Transformer Engine (which fuses its own layers) is installed."""
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def fused_kernels(cfg: ModelConfig, on_gpu: bool | None = None) -> dict[str, bool]:
    """Which fused kernels the model uses; ``on_gpu`` defaults to "the CPU runtime is off".

    Fused kernels exist only on GPU; their torch fallbacks compute the same thing.
    """
    on_gpu = not cpu.is_enabled() if on_gpu is None else on_gpu
    return dict(
        bias_activation_fusion=on_gpu and cfg.swiglu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=on_gpu,
        apply_rope_fusion=on_gpu and cfg.transformer_impl == "transformer_engine",
        gradient_accumulation_fusion=on_gpu and gradient_accumulation_fusion_available(),
    )


def describe_fused_kernels(cfg: ModelConfig) -> str:
    """The plan's line: the fused kernels this machine would build the model with."""
    kernels = fused_kernels(cfg, on_gpu=torch.cuda.is_available())
    names = [name.removeprefix("apply_").removesuffix("_fusion") for name, on in kernels.items() if on]
    return "fused kernels: " + (", ".join(names) if names else "none (torch fallbacks)")


def layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """Megatron-Core's local spec on CPU; Transformer Engine's when asked for and present."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if cfg.transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise ConfigError("transformer_impl=transformer_engine but transformer_engine is not installed")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=cfg.qk_layernorm, normalization=cfg.normalization
    )
    if spec.submodules.input_layernorm is WrappedTorchNorm:  # apex's FusedLayerNorm handles SP itself
        spec.submodules.input_layernorm = SequenceParallelTorchNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    if cfg.attention_backend in ("auto", "sdpa"):
        from megatron_patches.sdpa_attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


class SequenceParallelTorchNorm:
    """Megatron-Core's torch norm (local spec) that also runs under sequence parallelism.

    Megatron-Core's ``WrappedTorchNorm`` refuses ``sequence_parallel``. With SP each TP rank
    normalizes its own slice of the sequence, so each rank's norm-weight gradient covers only
    its tokens: ``finalize_model_grads`` all-reduces the gradients of parameters tagged
    ``sequence_parallel`` over TP (Transformer Engine's and apex's norms tag theirs). Untagged,
    the replicated norm weights drift apart across TP ranks without an error.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs: Any):
        import copy

        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        unsharded = copy.copy(config)  # the same norm; the tag below does what SP needs of it
        unsharded.sequence_parallel = False
        norm = WrappedTorchNorm(unsharded, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _block_spec(spec: ModuleSpec, config: TransformerConfig, vp_stage: int | None) -> Any:
    """The decoder's spec with the local spec's final norm also SP-capable (Megatron picks
    ``WrappedTorchNorm`` for it when Transformer Engine and apex are absent)."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if spec.submodules.input_layernorm is not SequenceParallelTorchNorm:
        return spec  # Transformer Engine's or apex's norms, which handle SP themselves
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=SequenceParallelTorchNorm)


def build_gpt_model(
    cfg: ModelConfig,
    config: TransformerConfig,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
) -> GPTModel:
    """One pipeline stage (or virtual chunk) of the model on this rank."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=_block_spec(layer_spec(cfg), config, vp_stage),
        vocab_size=cfg.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        rotary_percent=cfg.rotary_percent,
        rotary_base=cfg.rotary_base,
        rope_scaling=cfg.use_rope_scaling,
        rope_scaling_factor=cfg.rope_scaling_factor,
        seq_len_interpolation_factor=cfg.rotary_seq_len_interpolation_factor,
        vp_stage=vp_stage,
    )


def mask_vocab_padding(model: GPTModel, vocab_size: int) -> None:
    """Give the padded vocabulary rows zero probability in the training loss.

    Megatron-Core pads the embedding and output layer to a multiple of
    ``make_vocab_size_divisible_by * TP`` rows, and
    ``LanguageModule.compute_language_model_loss`` takes the softmax over all of
    them, so a converted HF model's loss differs from HF's by the mass of the
    padding logits, and the padding rows keep being trained towards -inf. Here
    the padding columns of this TP rank's logits are set to the dtype's minimum
    before that loss: they get no probability and no gradient, and the loss is
    the unpadded model's.
    """
    from megatron.core import parallel_state as ps

    padded = model.vocab_size
    if not model.post_process or padded == vocab_size:
        return
    per_rank = padded // ps.get_tensor_model_parallel_world_size()
    first = ps.get_tensor_model_parallel_rank() * per_rank
    valid = min(max(vocab_size - first, 0), per_rank)
    if valid == per_rank:
        return
    original = model.compute_language_model_loss

    def loss_without_padding(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        pad = torch.arange(per_rank, device=logits.device) >= valid  # logits: [s, b, vocab / TP]
        return original(labels, logits.masked_fill(pad, torch.finfo(logits.dtype).min))

    model.compute_language_model_loss = loss_without_padding


def build_model_for_this_rank(
    cfg: ModelConfig, params_dtype: torch.dtype = torch.float32, **overrides: Any
) -> GPTModel:
    """The stage of ``cfg`` this rank owns under the initialized parallel state."""
    from megatron.core import parallel_state as ps

    cfg = resolve_transformer_impl(cfg)  # plan_run already did, unless called from elsewhere
    config = transformer_config(
        cfg,
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        params_dtype,
        **overrides,
    )
    model = build_gpt_model(cfg, config, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    mask_vocab_padding(model, cfg.vocab_size)
    return model.to(cpu.device())
