"""A run's memory plan per phase (training/memory_plan.py) and the refusal above ``train.gpu_memory_gb``.

Every rank computes the same plans from the validated config before anything is
built, so a run that would not fit stops everywhere with one line: the
breakdown and the largest micro-batch that fits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_patches.errors import ConfigError
from megatron_patches.training.memory_plan import (
    GIB,
    MemoryPlan,
    PlanLayout,
    Precision,
    Workload,
    largest_micro_batch,
    plan_memory,
)

if TYPE_CHECKING:
    from megatron_patches.parallel import Layout
    from megatron_patches.training.config import Config
    from megatron_patches.training.data import Phase


def run_layout(cfg: Config, layout: Layout) -> PlanLayout:
    parallel = cfg.parallel
    return PlanLayout(
        tensor_parallel=layout.tensor_model_parallel_size,
        pipeline_parallel=layout.pipeline_model_parallel_size,
        data_parallel=layout.data_parallel_size,
        context_parallel=parallel.context_parallel_size,
        virtual_pipeline=layout.model_chunks,  # either VPP key, resolved by plan_run
        sequence_parallel=bool(parallel.sequence_parallel),  # plan_run resolved the default
        expert_parallel=layout.expert_model_parallel_size,
        expert_tensor_parallel=layout.expert_tensor_size,
    )


def run_precision(cfg: Config, data_parallel: int) -> Precision:
    ddp = cfg.ddp
    bucket_size = None
    if ddp.overlap_grad_reduce:  # else one bucket per chunk (Megatron-Core)
        bucket_size = ddp.bucket_size or max(40_000_000, 1_000_000 * data_parallel)
    return Precision(bf16=cfg.train.bf16, bucket_size=bucket_size)


def phase_workloads(cfg: Config, phases: list[Phase]) -> list[tuple[str, Workload]]:
    model = cfg.model
    recompute = (model.recompute_granularity, model.recompute_method, model.recompute_num_layers)
    return [
        (p.name, Workload(p.seq_length, p.micro_batch_size, p.global_batch_size, recompute)) for p in phases
    ]


def run_plans(cfg: Config, layout: Layout, phases: list[Phase]) -> list[tuple[str, Workload, MemoryPlan]]:
    """The plan of every phase (RoPE stages change the sequence length and batch)."""
    plan_layout = run_layout(cfg, layout)
    precision = run_precision(cfg, plan_layout.data_parallel)
    return [
        (name, work, plan_memory(cfg.model, plan_layout, precision, work))
        for name, work in phase_workloads(cfg, phases)
    ]


def describe_run(cfg: Config, layout: Layout, phases: list[Phase]) -> list[str]:
    return [f"phase {name}: {plan.describe()}" for name, _, plan in run_plans(cfg, layout, phases)]


def check_fits(cfg: Config, layout: Layout, phases: list[Phase], budget_gb: float | None) -> None:
    """Refuse (one line, with the breakdown) a phase whose plan exceeds ``budget_gb`` per GPU."""
    if budget_gb is None:
        return
    budget = budget_gb * GIB
    for name, work, plan in run_plans(cfg, layout, phases):
        if plan.total <= budget:
            continue
        plan_layout = run_layout(cfg, layout)
        precision = run_precision(cfg, plan_layout.data_parallel)
        fits = largest_micro_batch(cfg.model, plan_layout, precision, work, budget)
        advice = f"micro_batch_size={fits} fits" if fits else "no micro-batch size fits this layout"
        raise ConfigError(
            f"phase {name} needs more than train.gpu_memory_gb={budget_gb:g} GiB per GPU: "
            f"{plan.describe()}; {advice} (or raise TP/PP, recompute, sequence_parallel)"
        )


def device_memory_gb() -> float | None:
    """The visible GPU's memory in GiB; None on CPU (no refusal)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB
