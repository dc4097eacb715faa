"""Options that change how a step is computed, never what it computes.

Sequence parallel (``parallel.sequence_parallel``), context parallel
(``parallel.context_parallel_size``), activation recompute (``model.recompute_*``),
overlapped DDP communication (the ``ddp`` section) and data-reading threads
(``data.num_workers``) trade memory or time, with the same losses as a run
without them. :func:`check_parallel_options` refuses, in one line and before any
rank builds anything, what Megatron-Core would otherwise assert on some ranks
only (or accept and get wrong); :func:`resolve_sequence_parallel` turns the
``None`` default into the bool every later step reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_patches.errors import ConfigError
from megatron_patches.parallel import Layout

if TYPE_CHECKING:
    from megatron_patches.training.config import Config


def resolve_sequence_parallel(
    sequence_parallel: bool | None, tensor_parallel: int, on_gpu: bool, moe: bool = False
) -> bool:
    """The default is on wherever it saves memory (TP > 1 on a GPU), off on CPU.

    On CPU it gives identical losses (tests prove it) but no memory is short there, and
    keeping it off keeps every CPU layout's sequence length free of the TP divisibility rule.
    A MoE model with TP > 1 needs it everywhere (Megatron-Core's ``MoELayer.forward`` refuses to
    train without it).
    """
    if sequence_parallel is None:
        return tensor_parallel > 1 and (on_gpu or moe)
    return sequence_parallel


def check_parallel_options(cfg: Config, layout: Layout, seq_lengths: list[int]) -> None:
    """Raise :class:`ConfigError` for a combination Megatron-Core cannot run (or this trainer refuses)."""
    _check_sequence_parallel(cfg, layout, seq_lengths)
    _check_context_parallel(cfg)
    _check_recompute(cfg, layout)
    _check_ddp(cfg)
    _check_moe(cfg, layout)
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")


def _check_sequence_parallel(cfg: Config, layout: Layout, seq_lengths: list[int]) -> None:
    if not cfg.parallel.sequence_parallel:
        return
    tp = layout.tensor_model_parallel_size
    if tp == 1:
        raise ConfigError(
            "parallel.sequence_parallel=true needs tensor_model_parallel_size > 1 "
            "(it splits the sequence over the TP ranks); unset it"
        )
    for seq_length in sorted(set(seq_lengths)):
        if seq_length % tp:
            raise ConfigError(
                f"parallel.sequence_parallel=true splits the sequence over TP: seq_length ({seq_length}) "
                f"is not divisible by tensor_model_parallel_size ({tp})"
            )


def _check_context_parallel(cfg: Config) -> None:
    size = cfg.parallel.context_parallel_size
    if size < 1:
        raise ConfigError(f"parallel.context_parallel_size must be >= 1, got {size}")
    if size == 1:
        return
    if cfg.model.transformer_impl != "transformer_engine":
        raise ConfigError(
            f"parallel.context_parallel_size={size} needs Transformer Engine attention "
            f"(model.transformer_impl=transformer_engine on a GPU with transformer_engine installed); "
            f"this run uses the {cfg.model.transformer_impl} spec"
        )
    raise ConfigError(
        f"parallel.context_parallel_size={size} is not supported by this trainer yet "
        "(it does not split batches over CP ranks); use recompute or a smaller seq_length"
    )


def _check_recompute(cfg: Config, layout: Layout) -> None:
    model = cfg.model
    if model.recompute_granularity != "full":
        return  # ModelConfig.validate checked the combination
    # Megatron-Core recomputes within one model chunk (a virtual stage with the interleaved pipeline)
    pp, chunks = layout.pipeline_model_parallel_size, layout.model_chunks
    per_stage = model.num_layers // (pp * chunks)
    if model.recompute_num_layers > per_stage:
        stage = f"PP {pp}" + (f" x VPP {chunks}" if chunks > 1 else "")
        raise ConfigError(
            f"model.recompute_num_layers ({model.recompute_num_layers}) exceeds the layers per pipeline "
            f"stage (num_layers {model.num_layers} / {stage} = {per_stage})"
        )


def _check_ddp(cfg: Config) -> None:
    ddp = cfg.ddp
    if ddp.overlap_param_gather and not ddp.overlap_grad_reduce:
        raise ConfigError(
            "ddp.overlap_param_gather=true needs ddp.overlap_grad_reduce=true (as in Megatron-LM)"
        )
    if ddp.bucket_size is not None and ddp.bucket_size < 1:
        raise ConfigError(f"ddp.bucket_size must be a positive number of parameters, got {ddp.bucket_size}")
    if ddp.average_in_collective:
        raise ConfigError(
            "ddp.average_in_collective=true cannot be used: the loss is per token (gradients are summed "
            "over DP and divided by the global batch's token count), so Megatron-Core refuses it; unset it"
        )


def _check_moe(cfg: Config, layout: Layout) -> None:
    """What Megatron-Core's MoE layer asserts at run time, or gloo cannot do, as one line up front."""
    import torch

    model = cfg.model
    if model.num_moe_experts is None:
        return
    if layout.tensor_model_parallel_size > 1 and not cfg.parallel.sequence_parallel:
        raise ConfigError(
            "a MoE model with tensor_model_parallel_size > 1 needs parallel.sequence_parallel=true "
            "(Megatron-Core's MoELayer refuses to train without it)"
        )
    if torch.cuda.is_available():
        return
    if model.moe_grouped_gemm:
        raise ConfigError("model.moe_grouped_gemm=true needs a GPU (grouped GEMM kernels); unset it on CPU")
    if model.moe_token_dispatcher_type == "alltoall" and layout.expert_tensor_size > 1:
        # Its all-gather-v/reduce-scatter-v over the expert-TP group has unequal sizes, which gloo refuses.
        raise ConfigError(
            "moe_token_dispatcher_type=alltoall with expert_tensor_parallel_size "
            f"{layout.expert_tensor_size} does not run on CPU (gloo); "
            "set parallel.expert_tensor_parallel_size=1 or use allgather"
        )
