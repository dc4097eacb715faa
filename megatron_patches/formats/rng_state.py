"""Every RNG stream of a rank, and its place in a ``torch_dist`` checkpoint.

Resuming bit-exactly needs Python's, NumPy's and torch's generators plus
Megatron-Core's CUDA-RNG tracker (``tensor_parallel.get_cuda_rng_tracker``,
the per-TP-rank dropout/init streams). :func:`sharded` stores them as
Megatron-LM's ``get_rng_state`` does for ``torch_dist``. In the bottom layer
because both the checkpoint and the probes patch (which must not disturb the
streams) use it; Megatron-Core is imported only inside the functions.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from megatron.core.dist_checkpointing.mapping import ShardedObject


def capture() -> dict[str, Any]:
    """Every RNG stream of this rank: Python, NumPy, torch CPU/CUDA, Megatron's CUDA-RNG tracker."""
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict[str, Any]) -> None:
    """Set every stream :func:`capture` recorded."""
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def sharded(loading: bool, per_global_rank: bool = False) -> ShardedObject:
    """The RNG streams of this rank's DP group, sharded as Megatron-LM's ``get_rng_state`` does.

    One ``ShardedObject`` per (PP, TP) position holds the list of its DP
    replicas' states, written once (``replica_id`` = DP rank, so DP rank 0
    writes it). A resume at another DP size (another node count) therefore
    still finds every shard it asks for; one indexed by global rank would not.
    ``per_global_rank`` reads checkpoints written before (one dict per rank).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if per_global_rank:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return ShardedObject("rng_state", None, (world,), (rank,), replica_id=0)
    states = None
    if not loading:
        states = [None] * ps.get_data_parallel_world_size()
        torch.distributed.all_gather_object(states, capture(), group=ps.get_data_parallel_group())
    return ShardedObject(
        "rng_state",
        states,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(),
    )


def restore_dp_rank(states: list[dict[str, Any]]) -> None:
    """Restore this DP rank's streams; after a DP-size change every rank takes DP rank 0's."""
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if len(states) == dp_size:
        restore(states[dp_rank])
        return
    if torch.distributed.get_rank() == 0:
        print(
            f"note: checkpoint saved at DP={len(states)}, resuming at DP={dp_size}: every rank restarts "
            "from DP rank 0's RNG streams, so losses are not bit-exact with an unchanged layout"
        )
    restore(states[0])
