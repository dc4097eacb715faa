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
from megatron_patches.formats.model_config import MLA_FIELDS, ModelConfig

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
    from megatron.core.transformer.transformer_config import MLATransformerConfig

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
    if cfg.multi_latent_attention:
        return MLATransformerConfig(**values, **_mla_fields(cfg))
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
        **_moe_fields(cfg),
    )


def _moe_fields(cfg: ModelConfig) -> dict[str, Any]:
    """Megatron-Core's MoE ``TransformerConfig`` fields (the same names); none for a dense model."""
    if cfg.num_moe_experts is None:
        return {}
    names = [f.name for f in dataclasses.fields(cfg) if f.name.startswith("moe_")]
    return dict(num_moe_experts=cfg.num_moe_experts, **{name: getattr(cfg, name) for name in names})


def _mla_fields(cfg: ModelConfig) -> dict[str, Any]:
    """``MLATransformerConfig``'s own fields (the same names); MLA applies RoPE itself (GPTModel skips it)."""
    return dict(rotary_base=cfg.rotary_base, **{name: getattr(cfg, name) for name in MLA_FIELDS})


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


def layer_spec(cfg: ModelConfig, moe: bool = False) -> ModuleSpec:
    """Megatron-Core's local spec on CPU; Transformer Engine's when asked for and present.

    ``moe``: the spec of a MoE layer (Megatron-Core's ``MoELayer``: router, routed experts,
    shared experts) instead of the dense MLP's.
    """
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    experts = dict(num_experts=cfg.num_moe_experts, moe_grouped_gemm=cfg.moe_grouped_gemm) if moe else {}
    experts["multi_latent_attention"] = cfg.multi_latent_attention
    if cfg.transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise ConfigError("transformer_impl=transformer_engine but transformer_engine is not installed")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=cfg.qk_layernorm, **experts
        )
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=cfg.qk_layernorm, normalization=cfg.normalization, **experts
    )
    if spec.submodules.input_layernorm is WrappedTorchNorm:  # apex's FusedLayerNorm handles SP itself
        spec.submodules.input_layernorm = SequenceParallelTorchNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    attention = spec.submodules.self_attention.submodules
    if attention.q_layernorm is WrappedTorchNorm:  # qk_layernorm: refused under SP as well
        # Each TP rank normalizes its own heads; the SP tag sums their weight gradients over TP.
        attention.q_layernorm = SequenceParallelTorchNorm
        if cfg.multi_latent_attention:  # MLA's latent norms (MLASelfAttentionSubmodules)
            attention.kv_layernorm = SequenceParallelTorchNorm
        else:
            attention.k_layernorm = SequenceParallelTorchNorm
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


def _block_spec(cfg: ModelConfig, config: TransformerConfig, vp_stage: int | None) -> Any:
    """The decoder's spec for this stage (or virtual chunk): the local spec's final norm also
    SP-capable (Megatron picks ``WrappedTorchNorm`` for it when Transformer Engine and apex are
    absent), and MoE or dense layers as ``model.moe_layer_freq`` says (as Megatron-Core's
    ``get_gpt_decoder_block_spec``, which cannot take this module's norm and attention)."""
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    dense = layer_spec(cfg)
    sp_norm = dense.submodules.input_layernorm is SequenceParallelTorchNorm
    pattern = cfg.moe_layer_pattern()
    if not (sp_norm or any(pattern)):
        return dense  # Transformer Engine's or apex's norms, which handle SP themselves
    moe = layer_spec(cfg, moe=True) if any(pattern) else dense
    first = get_transformer_layer_offset(config, vp_stage=vp_stage)
    layers = transformer_block.get_num_layers_to_build(config, vp_stage=vp_stage)
    return transformer_block.TransformerBlockSubmodules(
        layer_specs=[moe if pattern[first + i] else dense for i in range(layers)],
        layer_norm=SequenceParallelTorchNorm if sp_norm else transformer_block.LayerNormImpl,
    )


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
        transformer_layer_spec=_block_spec(cfg, config, vp_stage),
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
    """The stage of ``cfg`` this rank owns under the initialized parallel state (no interleaving)."""
    chunks = build_model_chunks_for_this_rank(cfg, params_dtype, **overrides)
    if len(chunks) != 1:
        raise ConfigError(f"this rank holds {len(chunks)} virtual pipeline chunks; use the list of them")
    return chunks[0]


def build_model_chunks_for_this_rank(
    cfg: ModelConfig, params_dtype: torch.dtype = torch.float32, **overrides: Any
) -> list[GPTModel]:
    """This rank's model chunks, one per virtual pipeline stage (one without interleaving).

    As Megatron-LM's ``get_model``: chunk ``i`` holds the layers of virtual stage ``i`` (Megatron-Core's
    ``get_transformer_layer_offset`` with ``vp_stage``); only chunk 0 of the first PP rank embeds and
    only the last chunk of the last PP rank has the output layer. All chunks share one config.
    """
    from megatron.core import parallel_state as ps

    cfg = resolve_transformer_impl(cfg)  # plan_run already did, unless called from elsewhere
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp is not None:
        overrides = {"virtual_pipeline_model_parallel_size": vpp, **overrides}
        if torch.distributed.get_backend() == "gloo":
            # With PP=2 the previous and next stage are the same rank, and gloo pairs the batched
            # send/recv of the interleaved schedule the wrong way round: losses go silently wrong
            # from the third micro-batch on. Separate isend/irecv ops are exchanged correctly.
            overrides = {"batch_p2p_comm": False, **overrides}
    if cfg.num_moe_experts is not None:
        overrides = dict(
            expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
            expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
            **overrides,
        )
    config = transformer_config(
        cfg,
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        params_dtype,
        **overrides,
    )
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp is not None else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        model = build_gpt_model(cfg, config, pre, post, vp_stage=stage)
        mask_vocab_padding(model, cfg.vocab_size)
        chunks.append(model.to(cpu.device()))
    return chunks
