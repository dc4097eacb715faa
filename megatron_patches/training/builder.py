"""Build the Megatron-Core training objects of this rank from a validated config.

Model stage (``GPTModel``) -> ``DistributedDataParallel`` -> distributed
optimizer (``get_megatron_optimizer``, ZeRO-1) -> LR scheduler. With
``train.bf16`` the parameters are bf16 (wrapped in ``Float16Module`` as
Megatron-LM does) with fp32 main grads and main params in the optimizer;
otherwise everything is fp32. bf16 works on CPU too (slowly), which lets CI
exercise the GPU precision path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megatron_patches.parallel import model_chunks
from megatron_patches.training.config import Config, DDPConfig, OptimConfig
from megatron_patches.training.model import build_model_chunks_for_this_rank
from megatron_patches.training.schedules import PretrainScheduler

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer


class ModelChunks(torch.nn.ModuleList):
    """This rank's model chunks under the interleaved pipeline (one per virtual stage), in order.

    Megatron-Core's schedules and Megatron-LM's checkpoints take the chunks as a list
    (``parallel.model_chunks``); the loop treats them as one module (``train``/``eval``/``parameters``).
    """

    def zero_grad_buffer(self) -> None:
        for chunk in self:
            chunk.zero_grad_buffer()


@dataclass
class TrainingObjects:
    model: torch.nn.Module  # DDP around this rank's GPTModel stage; ModelChunks of them with VPP
    optimizer: MegatronOptimizer  # a ChainedOptimizer of DistributedOptimizers
    scheduler: PretrainScheduler

    @property
    def gpt(self):
        """This rank's ``GPTModel`` stage inside DDP (and ``Float16Module`` with bf16); a ``ModuleList``
        of them, one per virtual stage, with the interleaved pipeline."""
        stages = [_inner(chunk.module) for chunk in model_chunks(self.model)]
        return torch.nn.ModuleList(stages) if isinstance(self.model, ModelChunks) else stages[0]


def _inner(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def params_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.train.bf16 else torch.float32


def build(cfg: Config) -> TrainingObjects:
    dtype = params_dtype(cfg)
    chunks = build_model_chunks_for_this_rank(
        cfg.model,
        dtype,
        calculate_per_token_loss=True,
        sequence_parallel=bool(cfg.parallel.sequence_parallel),  # plan_run resolved the default
    )
    wrapped = [wrap_for_training(gpt, cfg.ddp, index) for index, gpt in enumerate(chunks)]
    if len(wrapped) > 1:
        _sync_funcs_per_chunk(wrapped, cfg.ddp)
    model = ModelChunks(wrapped) if len(wrapped) > 1 else wrapped[0]
    optimizer = build_optimizer(cfg.optimizer, model, dtype)
    scheduler = PretrainScheduler(optimizer, cfg.optimizer, cfg.train.train_iters)
    return TrainingObjects(model, optimizer, scheduler)


def wrap_for_training(
    gpt: torch.nn.Module, ddp: DDPConfig | None = None, chunk_index: int = 0
) -> torch.nn.Module:
    """``Float16Module`` (bf16) and Megatron-Core's ``DistributedDataParallel`` around one stage.

    With ``ddp.overlap_grad_reduce`` the pipeline schedules hold back the gradient reduce of all
    but the last micro-batch (``no_sync_func``) and start each bucket's reduce-scatter as soon as
    its gradients are ready; with ``ddp.overlap_param_gather`` the next forward pass all-gathers
    the updated weights bucket by bucket (forward pre-hooks) instead of the optimizer step.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.transformer.module import Float16Module

    if gpt.config.params_dtype != torch.float32:
        # As Megatron-LM: bf16 compute, inputs cast on the first stage, fp32 outputs on the last.
        gpt = Float16Module(gpt.config, gpt)
    ddp = ddp or DDPConfig()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=True,
        overlap_grad_reduce=ddp.overlap_grad_reduce,
        overlap_param_gather=ddp.overlap_param_gather,
        bucket_size=ddp.bucket_size,
        average_in_collective=ddp.average_in_collective,
        check_for_nan_in_grad=False,
    )
    config = gpt.config
    config.finalize_model_grads_func = finalize_model_grads
    # As Megatron-LM's get_model: only the first chunk's gradients are bucketed for overlap
    model = DistributedDataParallel(config, ddp_config, gpt, disable_bucketing=chunk_index > 0)
    if ddp.overlap_grad_reduce:  # as Megatron-LM's setup for one model chunk
        config.no_sync_func = model.no_sync
        config.grad_sync_func = model.start_grad_sync
    if ddp.overlap_param_gather:
        config.param_sync_func = model.start_param_sync
    return model


def _sync_funcs_per_chunk(chunks: list[torch.nn.Module], ddp: DDPConfig) -> None:
    """As Megatron-LM's setup for several chunks: one no-sync/grad-sync/param-sync function each
    (the chunks share one config; ``wrap_for_training`` set the first chunk's alone)."""
    config = chunks[0].config
    if ddp.overlap_grad_reduce:
        config.no_sync_func = [chunk.no_sync for chunk in chunks]
        config.grad_sync_func = [chunk.start_grad_sync for chunk in chunks]
    if ddp.overlap_param_gather:
        config.param_sync_func = [chunk.start_param_sync for chunk in chunks]


def gather_params(model: torch.nn.Module) -> None:
    """Finish the weights' all-gather that ``ddp.overlap_param_gather`` defers to the next forward.

    Whatever reads the weights outside a forward pass (a checkpoint save) calls this first; a
    no-op without the overlap, where the optimizer step has already gathered them.
    """
    for chunk in model_chunks(model):
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def build_optimizer(opt: OptimConfig, model: torch.nn.Module, dtype: torch.dtype) -> MegatronOptimizer:
    """Megatron-Core's distributed optimizer (``get_megatron_optimizer``): Adam, ZeRO-1 over DP."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=True,
        ),
        model_chunks(model),
    )
