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
    virtual_pipeline_model_parallel_size: int | None = None  # model chunks per PP rank (interleaved 1F1B)
    expert_model_parallel_size: int = 1  # EP: the routed experts split over this many ranks
    expert_tensor_parallel_size: int | None = None  # ETP: each expert's FFN split; None: TP (Megatron-Core)

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    @property
    def model_chunks(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1

    @property
    def expert_tensor_size(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def expert_data_parallel_size(self) -> int:
        """Replicas of each expert: the ranks its distributed optimizer shards over (Megatron-Core's
        expert grid in ``initialize_model_parallel``: ETP x EP x expert-DP x PP = world)."""
        expert_grid = self.expert_tensor_size * self.expert_model_parallel_size
        return self.world_size // (expert_grid * self.pipeline_model_parallel_size)

    def describe(self) -> str:
        vpp = self.virtual_pipeline_model_parallel_size
        return (
            f"world {self.world_size} = TP {self.tensor_model_parallel_size} x "
            f"PP {self.pipeline_model_parallel_size} x DP {self.data_parallel_size}"
            + (f", {vpp} virtual stages per PP rank (interleaved 1F1B)" if vpp else "")
            + (
                f"; experts: EP {self.expert_model_parallel_size} x ETP {self.expert_tensor_size} x "
                f"expert-DP {self.expert_data_parallel_size}"
                if self.expert_model_parallel_size > 1 or self.expert_tensor_parallel_size
                else ""
            )
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
    _check_expert_grid(layout)
    if model is None:
        return
    model.validate()
    _require_divisible("num_attention_heads", model.num_attention_heads, "TP", tp)
    _require_divisible("num_query_groups", model.groups, "TP", tp)
    _require_divisible("ffn_hidden_size", model.ffn_hidden_size, "TP", tp)
    _require_divisible("num_layers", model.num_layers, "PP", pp)
    _check_virtual_pipeline(layout, model.num_layers)
    _check_experts(layout, model)
    _check_latent_attention(tp, model)


def _check_latent_attention(tp: int, model: ModelConfig) -> None:
    """The local spec's MLA splits its down projections over TP (``ColumnParallelLinear``); TE's
    keeps them whole (``parallel_mode='duplicated'``), so only the local spec needs these."""
    if not model.multi_latent_attention or model.transformer_impl == "transformer_engine":
        return
    if model.q_lora_rank is not None:
        _require_divisible("q_lora_rank", model.q_lora_rank, "TP", tp)
    latent = model.kv_lora_rank + model.qk_pos_emb_head_dim
    _require_divisible("kv_lora_rank + qk_pos_emb_head_dim", latent, "TP", tp)


def _check_virtual_pipeline(layout: Layout, num_layers: int) -> None:
    pp, vpp = layout.pipeline_model_parallel_size, layout.virtual_pipeline_model_parallel_size
    if vpp is None:
        return
    if vpp < 1:
        raise ConfigError(f"virtual_pipeline_model_parallel_size must be >= 1, got {vpp}")
    if pp < 2:
        raise ConfigError(
            f"virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size >= 2 (got {pp})"
        )
    _require_divisible("num_layers", num_layers, "PP x VPP", pp * vpp)


def _check_expert_grid(layout: Layout) -> None:
    """Megatron-Core's expert grid (``initialize_model_parallel``): ETP x EP x PP must divide the world."""
    ep, etp, pp = (
        layout.expert_model_parallel_size,
        layout.expert_tensor_size,
        layout.pipeline_model_parallel_size,
    )
    if ep < 1 or etp < 1:
        raise ConfigError(
            f"expert_model_parallel_size/expert_tensor_parallel_size must be >= 1, got {ep}/{etp}"
        )
    if layout.world_size % (ep * etp * pp):
        raise ConfigError(
            f"world size {layout.world_size} is not divisible by expert_tensor_parallel_size x "
            f"expert_model_parallel_size x PP = {etp} x {ep} x {pp} = {etp * ep * pp}"
        )


def _check_experts(layout: Layout, model: ModelConfig) -> None:
    ep, etp = layout.expert_model_parallel_size, layout.expert_tensor_size
    if model.num_moe_experts is None:
        if ep > 1 or layout.expert_tensor_parallel_size is not None:
            raise ConfigError(
                "expert_model_parallel_size/expert_tensor_parallel_size need model.num_moe_experts "
                "(a MoE model)"
            )
        return
    _require_divisible("num_moe_experts", model.num_moe_experts, "expert_model_parallel_size", ep)
    expert_ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size
    _require_divisible("moe_ffn_hidden_size", expert_ffn, "expert_tensor_parallel_size", etp)
    shared = model.moe_shared_expert_intermediate_size
    if shared is not None:  # the shared experts are dense MLPs, split over TP
        _require_divisible(
            "moe_shared_expert_intermediate_size", shared, "TP", layout.tensor_model_parallel_size
        )


def virtual_pipeline_size(
    num_layers: int, pp: int, vpp: int | None, layers_per_virtual_stage: int | None
) -> int | None:
    """The model chunks per PP rank from either of Megatron-LM's two keys (None: no interleaving)."""
    if layers_per_virtual_stage is None:
        return vpp
    if vpp is not None:
        raise ConfigError(
            "give virtual_pipeline_model_parallel_size or num_layers_per_virtual_pipeline_stage, not both"
        )
    if layers_per_virtual_stage < 1 or num_layers % (pp * layers_per_virtual_stage):
        raise ConfigError(
            f"num_layers ({num_layers}) is not divisible by PP x num_layers_per_virtual_pipeline_stage "
            f"= {pp} x {layers_per_virtual_stage}"
        )
    return num_layers // (pp * layers_per_virtual_stage)


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
    import torch
    from megatron.core import parallel_state

    _check_pinned_api()

    actual = torch.distributed.get_world_size()
    if actual != layout.world_size:
        raise ConfigError(f"layout is for {layout.world_size} ranks but {actual} were started")
    validate_layout(layout, model)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
    )
    seed_rng_streams(seed)


def seed_rng_streams(seed: int) -> None:
    """Seed Python's, torch's and Megatron-Core's (``model_parallel_cuda_manual_seed``) streams.

    As Megatron-LM's ``_set_random_seed``: each pipeline stage initializes its
    layers from its own stream; DP replicas share one so they start equal.
    """
    import random

    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

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
    timeout = datetime.timedelta(minutes=timeout_minutes)
    torch.distributed.init_process_group(
        backend, rank=rank, world_size=world, timeout=timeout, store=_restart_round_store(world, timeout)
    )
    return rank, world


def _restart_round_store(world: int, timeout: Any) -> Any:
    """torchrun's shared store scoped to this restart round, or None (``init_process_group`` makes one).

    torchrun's agent (static and c10d rendezvous) keeps ONE TCPStore for all ``--max-restarts``
    rounds and hands it to the ranks (TORCHELASTIC_USE_AGENT_STORE=True). In torch 2.13,
    ``torch.distributed.rendezvous._create_c10d_store`` does not prefix it per attempt ("We create
    a new TCPStore for every retry", which neither ``StaticTCPRendezvous.next_rendezvous`` nor
    ``DynamicRendezvousHandler.next_rendezvous`` does), so a restarted rank reads the dead round's
    gloo addresses (NCCL: unique ids) and fails: "Gloo connectFullMesh failed ... Connection refused"
    (pytorch/pytorch#135712). Prefixing by TORCHELASTIC_RESTART_COUNT is what torch <= 2.4 did. The
    count is per node: the launcher's static rendezvous restarts each node once per failure (its ranks
    fail at the next collective), but a c10d membership change does not count (pytorch/pytorch#108158).
    """
    import os

    import torch

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return torch.distributed.PrefixStore(f"/worker/attempt_{attempt}", agent_store)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_chunks(model: Any) -> list[Any]:
    """This rank's model chunks: the modules of a ``ModuleList`` (interleaved pipeline), else ``[model]``.

    Megatron-Core's schedules, ``finalize_model_grads`` and Megatron-LM's checkpoints take a list of
    chunks, one per virtual pipeline stage; without interleaving the trainer holds one module.
    """
    import torch

    return list(model) if isinstance(model, torch.nn.ModuleList) else [model]


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
