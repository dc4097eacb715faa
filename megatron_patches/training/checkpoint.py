"""Training checkpoints: Megatron-Core ``torch_dist`` saves that are atomic, resumable, pruned.

A checkpoint is ``<save>/iter_XXXXXXX/``, written by
``megatron.core.dist_checkpointing.save`` from the model's and the distributed
optimizer's sharded state dicts plus the scheduler, every rank's RNG streams
(sharded by PP/TP position, see :func:`rng_state.sharded`), the iteration, consumed
samples and ``model_config``. Rank 0 makes a temporary directory named after
its owner (``.iter_XXXXXXX.partial-<host>-<pid>-<hex>``, ``megatron_patches.paths``),
every rank writes into it, and rank 0 renames it once every rank has finished;
the tracker file ``latest_checkpointed_iteration.txt`` is replaced last, and
only then are checkpoints beyond ``keep_last`` deleted. An interrupted save
therefore leaves a hidden directory that nothing reads, never one that looks
complete; the next save removes it once its owner is gone.

The on-disk names (tracker file, iteration directories, common-state keys)
belong to ``megatron_patches.formats.checkpoint``, which the converter shares. Every read
goes through ``megatron_patches.safe_load``, which refuses pickled code and
truncated shards before Megatron-Core unpickles anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_patches import checkpoint_writers, paths, safe_load
from megatron_patches.errors import ConfigError
from megatron_patches.formats import checkpoint as ckpt_format
from megatron_patches.formats import rng_state
from megatron_patches.formats.megatron_lm_args import megatron_lm_args
from megatron_patches.formats.model_config import RUNTIME_ONLY_FIELDS, ModelConfig
from megatron_patches.parallel import model_chunks, seed_rng_streams
from megatron_patches.training import optimizer_sharding

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import MegatronOptimizer

    from megatron_patches.training.schedules import PretrainScheduler


@dataclass
class TrainState:
    """What a resume needs besides model and optimizer tensors."""

    iteration: int = 0
    consumed_samples: int = 0
    patch_state: dict | None = None
    run_settings: dict | None = None  # what the resume must keep (run_settings.py); saved, checked on resume
    skip_samples: list | None = None  # skip_windows as JSON: data never read (roll-backs, data.skip_samples)
    branched_from: int | None = None  # checkpoint.load_iteration this run went back to


def check_architecture(path: Path, model: ModelConfig, given: ModelConfig | None = None) -> None:
    """Stop with one line when the checkpoint at ``path`` holds another architecture.

    ``given`` (checkpoint.pretrained_model_config) stands in for a checkpoint that records none.
    """
    saved = _saved_model_config(path, given, model).to_dict()
    mine = model.to_dict()
    keys = [k for k in sorted(set(saved) | set(mine)) if k not in RUNTIME_ONLY_FIELDS]
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs config {mine.get(k)!r}"
        for k in keys
        if saved.get(k) != mine.get(k)
    ]
    if diffs:
        raise ConfigError(f"checkpoint {path} is another architecture ({'; '.join(diffs)})")


def model_config_from(path: Path, current: ModelConfig, given: ModelConfig | None = None) -> ModelConfig:
    """The checkpoint's architecture, keeping ``current``'s runtime-only choices (kernels, dropout)."""
    saved = _saved_model_config(path, given, current)
    runtime = {name: getattr(current, name) for name in RUNTIME_ONLY_FIELDS}
    return dataclasses.replace(saved, **runtime)


def _saved_model_config(path: Path, given: ModelConfig | None, current: ModelConfig) -> ModelConfig:
    """This project's model_config, else Megatron-LM's args, else ``given``; else one line naming the key.

    Megatron-LM's args record only the padded vocabulary: the run's ``model.vocab_size`` (its
    tokenizer's) stands when it fits, so the padded rows stay out of the loss as in our own runs.
    """
    saved = ModelConfig.from_dict(ckpt_format.read_common(path, given).model_config)
    if current.vocab_size <= saved.vocab_size and not ckpt_format.records_vocabulary(path):
        return dataclasses.replace(saved, vocab_size=current.vocab_size)
    return saved


def _sharded_state(
    model: GPTModel,
    optimizer: MegatronOptimizer,
    scheduler: PretrainScheduler,
    train_state: TrainState,
    model_cfg: ModelConfig,
    loading: bool,
    rng_per_global_rank: bool = False,
    optim_meta: dict | None = None,  # optimizer_sharding.metadata(): the format saved or to load
    with_rng: bool = True,  # False: per-rank RNG streams do not map onto another TP/PP layout
) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    model_sd = model_sharded_state(model)
    layout = [ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()]
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    common = ckpt_format.CommonState(
        model_config=model_cfg.to_dict(),
        iteration=train_state.iteration,
        consumed_samples=train_state.consumed_samples,
        parallel_layout=layout,
        data_parallel_size=ps.get_data_parallel_world_size(),
        run_settings=train_state.run_settings or {},
        patch_state=train_state.patch_state or {},
        args=megatron_lm_args(model_cfg, *layout, vpp),  # Megatron-LM's --use-checkpoint-args reads it
        skip_samples=train_state.skip_samples or [],
        branched_from=train_state.branched_from,
    )
    meta = optim_meta or optimizer_sharding.metadata(fully_reshardable=True)
    rng = {"rng_state": rng_state.sharded(loading, rng_per_global_rank)} if with_rng else {}
    return {
        **model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=meta),
        "opt_param_scheduler": scheduler.state_dict(),
        **rng,
        **common.to_dict(),
    }


def save(
    save_dir: str | Path,
    model: GPTModel,
    optimizer: MegatronOptimizer,
    scheduler: PretrainScheduler,
    train_state: TrainState,
    model_cfg: ModelConfig,
    keep_last: int,
    fully_reshardable: bool = False,
    keep_from: int | None = None,
) -> Path:
    """Write the checkpoint of ``train_state.iteration`` atomically; prune to ``keep_last`` (sparing
    the newest at or before iteration ``keep_from`` and newer ones: ``ckpt_format.prune``).

    ``fully_reshardable`` (``checkpoint.dist_ckpt_optim_fully_reshardable``): the optimizer state in
    model space, loadable at another TP/PP/DP (see :mod:`optimizer_sharding`).
    """
    from megatron.core import dist_checkpointing

    root = Path(save_dir)
    final = root / ckpt_format.iteration_dir_name(train_state.iteration)
    temp = _temp_dir_from_rank0(root, final)
    meta = optimizer_sharding.metadata(fully_reshardable)
    state = _sharded_state(model, optimizer, scheduler, train_state, model_cfg, False, optim_meta=meta)
    checkpoint_writers.bind_to_this_process()  # its writer processes must not outlive a killed rank
    dist_checkpointing.save(state, str(temp), content_metadata=meta)  # as Megatron-LM records it
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        paths.commit_atomic_dir(temp, final)
        ckpt_format.write_tracker(root, train_state.iteration)
        ckpt_format.prune(root, keep_last, keep_from)
    torch.distributed.barrier()
    return final


def _temp_dir_from_rank0(root: Path, final: Path) -> Path:
    """The save's temporary directory: rank 0 makes it (after removing dead saves' ones), all ranks get it."""
    path = [None]
    if torch.distributed.get_rank() == 0:
        paths.report_cleanup(ckpt_format.clean_stale_saves(root), "saves")
        path = [str(paths.begin_atomic_dir(final, replace=True, writers="saves"))]
    torch.distributed.broadcast_object_list(path, src=0)  # the name holds rank 0's pid
    return Path(path[0])


def load(
    path: Path,
    model: GPTModel,
    optimizer: MegatronOptimizer,
    scheduler: PretrainScheduler,
    model_cfg: ModelConfig,
    seed: int | None = None,
) -> TrainState:
    """Restore model, optimizer, scheduler and RNG from ``path``; return the train state.

    At another TP/PP than the checkpoint's (validated beforehand: its optimizer state must be
    ``fully_reshardable``) the RNG streams restart from ``seed`` (see :func:`_restore_rng`).
    """
    optimizer_sharding.allocate_adam_state(optimizer)
    saved = saved_layout(path)
    older = saved is None  # written before the RNG state was sharded by (PP, TP)
    relayout = not older and saved != current_layout()
    meta = optimizer_sharding.common_state_sharding(path)  # load the format it was saved in
    template = _sharded_state(
        model, optimizer, scheduler, TrainState(), model_cfg, True, older, meta, not relayout
    )
    state = safe_load.load_sharded(template, path)
    load_model_state(model, state)
    steps = optimizer_sharding.saved_adam_steps(optimizer, state["optimizer"])
    # fp32 main params are views of the model's leaf parameters
    with torch.no_grad(), optimizer_sharding.step_kept_aside(optimizer):
        optimizer.load_state_dict(state["optimizer"])
    optimizer_sharding.restore_adam_steps(optimizer, steps)
    # OptimizerParamScheduler.load_state_dict *adds* the saved step count (step(increment=n)): from
    # a scheduler that already stepped (an in-process roll-back) the LR would land n steps too far.
    scheduler.num_steps = 0
    scheduler.load_state_dict(state["opt_param_scheduler"])
    _restore_rng(state, older, relayout, seed)
    return TrainState(
        state[ckpt_format.ITERATION],
        state[ckpt_format.CONSUMED_SAMPLES],
        state.get(ckpt_format.PATCH_STATE) or {},
        skip_samples=state.get(ckpt_format.SKIP_SAMPLES) or [],
        branched_from=state.get(ckpt_format.BRANCHED_FROM),
    )


def current_layout() -> tuple[int, int]:
    """(TP, PP) of this process's Megatron-Core parallel state."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()


def _restore_rng(state: dict[str, Any], older: bool, relayout: bool, seed: int | None) -> None:
    """This rank's saved RNG streams; at another TP/PP, fresh ones from ``seed`` + the iteration.

    Streams belong to a (PP, TP) position (dropout masks, Megatron-Core's tracker) and have no
    counterpart in another layout, so a re-layout resume seeds every stream as a fresh run of the
    new layout does (``parallel.seed_rng_streams``) from ``seed + iteration``: deterministic, and
    not a replay of the run's first iterations. Dropout masks then differ from the old layout's.
    """
    if relayout:
        base = seed if seed is not None else int(state[ckpt_format.RUN_SETTINGS]["seed"])
        seed_rng_streams(base + int(state[ckpt_format.ITERATION]))
    elif older:
        rng_state.restore(state["rng_state"])
    else:
        rng_state.restore_dp_rank(state["rng_state"])


def _common_state(path: Path) -> dict[str, Any]:
    return safe_load.load_common(path)


def saved_progress(path: Path) -> TrainState:
    """Iteration and consumed samples of the checkpoint at ``path``, from its common state only."""
    common = _common_state(path)
    return TrainState(
        int(common.get(ckpt_format.ITERATION, 0)), int(common.get(ckpt_format.CONSUMED_SAMPLES, 0))
    )


def saved_settings(path: Path) -> dict | None:
    """The run settings the checkpoint at ``path`` was written with; None when it predates them."""
    return _common_state(path).get(ckpt_format.RUN_SETTINGS) or None


def saved_lineage(path: Path) -> tuple[list, int | None]:
    """(skipped windows as JSON, the load_iteration it branched from) of the checkpoint at ``path``."""
    common = _common_state(path)
    return common.get(ckpt_format.SKIP_SAMPLES) or [], common.get(ckpt_format.BRANCHED_FROM)


def saved_data_parallel_size(path: Path) -> int | None:
    """DP of the run that wrote the checkpoint at ``path``; None for checkpoints that predate the record."""
    size = _common_state(path).get(ckpt_format.DATA_PARALLEL_SIZE)
    return None if size is None else int(size)


def saved_virtual_pipeline(path: Path) -> int | None:
    """Model chunks per PP rank of the run that wrote ``path`` (its Megatron-LM ``args``); None: one."""
    args = _common_state(path).get(ckpt_format.ARGS)
    return getattr(args, "virtual_pipeline_model_parallel_size", None)


def saved_layout(path: Path) -> tuple[int, int] | None:
    """(TP, PP) the checkpoint at ``path`` was written at; None for checkpoints that predate the record."""
    layout = _common_state(path).get(ckpt_format.PARALLEL_LAYOUT)
    return None if layout is None else (int(layout[0]), int(layout[1]))


def start_from_pretrained(
    path: Path, model: GPTModel, optimizer: MegatronOptimizer, model_cfg: ModelConfig
) -> None:
    """Fill the model with a release's weights (fresh optimizer state), in either format."""
    if ckpt_format.checkpoint_format(path) == "torch_dist":
        load_pretrained_torch_dist(path, model)
    else:
        load_pretrained(path, model, model_cfg)
    # The distributed optimizer took its fp32 main params from the random init when it was
    # built; re-copy them from the loaded weights (MegatronOptimizer.reload_model_params, as
    # Megatron-LM's load_checkpoint does when it loads no optimizer state).
    optimizer.reload_model_params()


def load_pretrained_torch_dist(path: Path, model: GPTModel) -> None:
    """Weights only, from a ``torch_dist`` checkpoint (``hf2mcore --format torch_dist``, or a run's).

    ``dist_checkpointing.load`` re-shards to this run's TP/PP and either spec,
    so unlike a legacy release it needs no ``mcore2mcore`` step; only the
    ``model`` entries are read (a trainer checkpoint's optimizer state is not).
    """
    load_model_state(model, safe_load.load_sharded(model_sharded_state(model), path))


def model_sharded_state(model: torch.nn.Module) -> dict[str, Any]:
    """Each model chunk's ``sharded_state_dict`` under Megatron-LM's key (``model`` or ``model0``, ...).

    The sharded tensors' keys name global layer numbers (Megatron-Core offsets each chunk's layers by
    its ``vp_stage``), so a checkpoint saved with one virtual pipeline layout loads at another.
    """
    chunks = model_chunks(model)
    keys = ckpt_format.model_keys(len(chunks))
    return {key: chunk.sharded_state_dict() for key, chunk in zip(keys, chunks, strict=True)}


def load_model_state(model: torch.nn.Module, state: dict[str, Any]) -> None:
    chunks = model_chunks(model)
    for key, chunk in zip(ckpt_format.model_keys(len(chunks)), chunks, strict=True):
        chunk.load_state_dict(state[key])


def check_pretrained_layout(
    path: Path, tp: int, pp: int, num_layers: int, vpp: int | None = None, ep: int = 1
) -> None:
    """Stop with one line unless a legacy ``release`` at ``path`` has this run's TP, PP, VPP, EP and
    stage split.

    The trainer builds ``num_layers / PP`` layers on every stage (``/ (PP x VPP)`` on every virtual
    stage); a release converted with uneven first/last stages or other model chunks would otherwise
    fail the strict load with a screenful of missing and unexpected keys. ``torch_dist``
    checkpoints are parallelism-independent and pass.
    """
    if ckpt_format.checkpoint_format(path) != "torch":
        return
    tp_ckpt, pp_ckpt, ep_ckpt = ckpt_format.legacy_grid(path)
    chunks = ckpt_format.model_chunk_count(
        ckpt_format.load_rank(path, 0, 0, pp_ckpt, mmap=True, ep_size=ep_ckpt)
    )
    flags = (f" --vpp {vpp}" if vpp else "") + (f" --ep {ep}" if ep > 1 or ep_ckpt > 1 else "")
    reshard = f"re-shard it with `python -m tools.convert mcore2mcore --tp {tp} --pp {pp}{flags}`"
    if (tp_ckpt, pp_ckpt, chunks, ep_ckpt) != (tp, pp, vpp or 1, ep):
        raise ConfigError(
            f"{path} was converted for {_layout_name(tp_ckpt, pp_ckpt, chunks, ep_ckpt)} but this run is "
            f"{_layout_name(tp, pp, vpp or 1, ep)}; {reshard}"
        )
    stages = pp * (vpp or 1)
    stored = ckpt_format.pipeline_layers(path, pp, ep)
    built = [num_layers // stages] * stages
    if stored != built:
        raise ConfigError(
            f"{path} holds {stored} layers per pipeline stage but this run builds {built} "
            f"(num_layers={num_layers}, PP={pp}); {reshard}"
        )


def _layout_name(tp: int, pp: int, chunks: int, ep: int = 1) -> str:
    return f"TP={tp} PP={pp}" + (f" VPP={chunks}" if chunks > 1 else "") + (f" EP={ep}" if ep > 1 else "")


def load_pretrained(path: Path, model, model_cfg: ModelConfig) -> None:
    """Weights only, from a ``tools/convert hf2mcore`` checkpoint converted at this TP/PP."""
    from megatron.core import parallel_state as ps

    pp_size = ps.get_pipeline_model_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    tp_size = ps.get_tensor_model_parallel_world_size()
    ep_size = ps.get_expert_model_parallel_world_size()
    check_pretrained_layout(path, tp_size, pp_size, model_cfg.num_layers, vpp, ep_size)
    for chunk_index, chunk in enumerate(model_chunks(model)):  # model0, model1, ... with VPP
        state, _ = ckpt_format.load_model_for_rank(
            path.parent,
            ps.get_tensor_model_parallel_rank(),
            ps.get_pipeline_model_parallel_rank(),
            pp_size,
            iteration=ckpt_format.iteration_of(path),
            spec="te" if model_cfg.transformer_impl == "transformer_engine" else "local",
            model_config=model_cfg,  # check_architecture matched it to a checkpoint that records none
            ep_rank=ps.get_expert_model_parallel_rank(),
            ep_size=ep_size,
            chunk=chunk_index,
        )
        _check_release_shapes(path, state, chunk)
        chunk.load_state_dict(state, strict=True)


def _check_release_shapes(path: Path, state: dict[str, Any], chunk: torch.nn.Module) -> None:
    """One line instead of load_state_dict's screenful when a tensor was split another way (e.g. the
    routed experts at another expert_tensor_parallel_size than this run's, ``mcore2mcore --etp``)."""
    built = chunk.state_dict()
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and key in built and built[key].shape != value.shape:
            raise ConfigError(
                f"{path} holds {key} of shape {tuple(value.shape)} but this run builds "
                f"{tuple(built[key].shape)}: it was converted for another layout (TP, ETP); re-shard it "
                "with `python -m tools.convert mcore2mcore` at this run's --tp/--ep/--etp"
            )
