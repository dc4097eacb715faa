"""Parallel layout: validate TP/PP/DP against the world and the model, then initialize.

Megatron-Core checks divisibility deep inside ``initialize_model_parallel`` or
a layer constructor, with an ``AssertionError`` on some ranks while the others
wait in a collective. :func:`validate_layout` checks everything first, on every
rank identically, so a bad layout stops all ranks at once with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_patches.compat import require_signature
from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig


def _check_pinned_api() -> None:
    """Checked when the parallel state is set up, not at import: the converter imports this module
    for :class:`Layout` and :func:`validate_layout` alone, and importing Megatron-Core costs it seconds."""
    from megatron.core import parallel_state

    require_signature(parallel_state.get_data_parallel_group, ["with_context_parallel"])


@dataclass(frozen=True)
class Layout:
    world_size: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    def describe(self) -> str:
        return (
            f"world {self.world_size} = TP {self.tensor_model_parallel_size} x "
            f"PP {self.pipeline_model_parallel_size} x DP {self.data_parallel_size}"
        )


def validate_layout(layout: Layout, model: ModelConfig | None = None) -> None:
    """Raise :class:`ConfigError` naming the numbers if ``layout`` cannot run ``model``."""
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ConfigError(f"tensor/pipeline parallel sizes must be >= 1, got TP={tp} PP={pp}")
    if layout.world_size % (tp * pp):
        raise ConfigError(
            f"world size {layout.world_size} is not divisible by TP x PP = {tp} x {pp} = {tp * pp}"
        )
    if model is None:
        return
    model.validate()
    _require_divisible("num_attention_heads", model.num_attention_heads, "TP", tp)
    _require_divisible("num_query_groups", model.groups, "TP", tp)
    _require_divisible("ffn_hidden_size", model.ffn_hidden_size, "TP", tp)
    _require_divisible("num_layers", model.num_layers, "PP", pp)


def _require_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if value % by:
        raise ConfigError(f"{name} ({value}) is not divisible by {by_name} ({by})")


def initialize(layout: Layout, seed: int, model: ModelConfig | None = None) -> None:
    """Validate, then set up Megatron-Core's parallel groups and RNG trackers.

    ``torch.distributed`` must already be initialized with ``layout.world_size``
    ranks. ``model_parallel_cuda_manual_seed`` must follow
    ``initialize_model_parallel`` or dropout forks fail ("cuda rng state
    model-parallel-rng is not added"); on CPU it seeds the CPU generator.
    """
    import random

    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    _check_pinned_api()

    actual = torch.distributed.get_world_size()
    if actual != layout.world_size:
        raise ConfigError(f"layout is for {layout.world_size} ranks but {actual} were started")
    validate_layout(layout, model)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
    )
    # As Megatron-LM's _set_random_seed: each pipeline stage initializes its
    # layers from its own stream; DP replicas share one so they start equal.
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int]:
    """Join the process group torchrun (or Slurm via torchrun) set up; return (rank, world size).

    Without a launcher this is a single-process world. On CPU the CPU runtime is
    enabled, ranks use gloo and share the cores instead of each taking all of them.
    """
    import datetime
    import os

    import torch

    from megatron_patches import cpu

    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        cpu.enable()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        backend = "gloo"
    torch.distributed.init_process_group(
        backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=timeout_minutes)
    )
    return rank, world


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gather_on_last_stage(obj: Any) -> list[Any] | None:
    """``all_gather_object`` of ``obj`` over the data-parallel group of the last pipeline stage.

    That group includes the context-parallel ranks (Megatron-Core's
    ``with_context_parallel``), so with CP > 1 each rank's partial sums still
    meet once. Returns the list (one entry per DP x CP rank) on last-stage
    ranks, which hold the losses and the logging rank; ``None`` elsewhere,
    where nothing is called. Each TP rank of the last stage gathers in its own
    group and gets the same list.
    """
    import torch
    from megatron.core import parallel_state

    from megatron_patches import cpu

    if not parallel_state.is_pipeline_last_stage():
        return None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    gathered = [None] * torch.distributed.get_world_size(group)
    with cpu.without_device_rewrites():  # gloo's object collectives name no CUDA device
        torch.distributed.all_gather_object(gathered, obj, group=group)
    return gathered
