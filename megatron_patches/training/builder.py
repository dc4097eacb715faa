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

from megatron_patches.training.config import Config, OptimConfig
from megatron_patches.training.model import build_model_for_this_rank
from megatron_patches.training.schedules import PretrainScheduler

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer


@dataclass
class TrainingObjects:
    model: torch.nn.Module  # DistributedDataParallel around this rank's GPTModel stage
    optimizer: MegatronOptimizer  # a ChainedOptimizer of DistributedOptimizers
    scheduler: PretrainScheduler

    @property
    def gpt(self):
        """This rank's ``GPTModel`` stage, inside DDP (and ``Float16Module`` with bf16)."""
        module = self.model.module
        return getattr(module, "module", module)


def params_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.train.bf16 else torch.float32


def build(cfg: Config) -> TrainingObjects:
    dtype = params_dtype(cfg)
    model = wrap_for_training(build_model_for_this_rank(cfg.model, dtype, calculate_per_token_loss=True))
    optimizer = build_optimizer(cfg.optimizer, model, dtype)
    scheduler = PretrainScheduler(optimizer, cfg.optimizer, cfg.train.train_iters)
    return TrainingObjects(model, optimizer, scheduler)


def wrap_for_training(gpt: torch.nn.Module) -> torch.nn.Module:
    """``Float16Module`` (bf16) and Megatron-Core's ``DistributedDataParallel`` around one stage."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.transformer.module import Float16Module

    if gpt.config.params_dtype != torch.float32:
        # As Megatron-LM: bf16 compute, inputs cast on the first stage, fp32 outputs on the last.
        gpt = Float16Module(gpt.config, gpt)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=True,
        overlap_grad_reduce=False,
        check_for_nan_in_grad=False,
    )
    gpt.config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(gpt.config, ddp_config, gpt)


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
        [model],
    )
