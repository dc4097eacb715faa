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
from collections.abc import Iterator
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

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import MegatronOptimizer

    from megatron_patches.training.schedules import PretrainScheduler

# The distributed optimizer's format re-shards across DP sizes only; TP/PP must match on resume.
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


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
) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    model_sd = model.sharded_state_dict()
    layout = [ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()]
    common = ckpt_format.CommonState(
        model_config=model_cfg.to_dict(),
        iteration=train_state.iteration,
        consumed_samples=train_state.consumed_samples,
        parallel_layout=layout,
        run_settings=train_state.run_settings or {},
        patch_state=train_state.patch_state or {},
        args=megatron_lm_args(model_cfg, *layout),  # Megatron-LM's --use-checkpoint-args reads it
        skip_samples=train_state.skip_samples or [],
        branched_from=train_state.branched_from,
    )
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=OPTIMIZER_SHARDING),
        "opt_param_scheduler": scheduler.state_dict(),
        "rng_state": rng_state.sharded(loading, rng_per_global_rank),
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
) -> Path:
    """Write the checkpoint of ``train_state.iteration`` atomically; prune to ``keep_last``."""
    from megatron.core import dist_checkpointing

    root = Path(save_dir)
    final = root / ckpt_format.iteration_dir_name(train_state.iteration)
    temp = _temp_dir_from_rank0(root, final)
    state = _sharded_state(model, optimizer, scheduler, train_state, model_cfg, loading=False)
    checkpoint_writers.bind_to_this_process()  # its writer processes must not outlive a killed rank
    dist_checkpointing.save(state, str(temp))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        paths.commit_atomic_dir(temp, final)
        ckpt_format.write_tracker(root, train_state.iteration)
        ckpt_format.prune(root, keep_last)
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
) -> TrainState:
    """Restore model, optimizer, scheduler and RNG from ``path``; return the train state."""
    allocate_adam_state(optimizer)
    older = saved_layout(path) is None  # written before the RNG state was sharded by (PP, TP)
    template = _sharded_state(model, optimizer, scheduler, TrainState(), model_cfg, True, older)
    state = safe_load.load_sharded(template, path)
    model.load_state_dict(state["model"])
    steps = saved_adam_steps(optimizer, state["optimizer"])
    with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
        optimizer.load_state_dict(state["optimizer"])
    restore_adam_steps(optimizer, steps)
    # OptimizerParamScheduler.load_state_dict *adds* the saved step count (step(increment=n)): from
    # a scheduler that already stepped (an in-process roll-back) the LR would land n steps too far.
    scheduler.num_steps = 0
    scheduler.load_state_dict(state["opt_param_scheduler"])
    if older:
        rng_state.restore(state["rng_state"])
    else:
        rng_state.restore_dp_rank(state["rng_state"])
    return TrainState(
        state[ckpt_format.ITERATION],
        state[ckpt_format.CONSUMED_SAMPLES],
        state.get(ckpt_format.PATCH_STATE) or {},
        skip_samples=state.get(ckpt_format.SKIP_SAMPLES) or [],
        branched_from=state.get(ckpt_format.BRANCHED_FROM),
    )


def _torch_adams(optimizer: MegatronOptimizer) -> Iterator[MegatronOptimizer]:
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            yield inner


def allocate_adam_state(optimizer: MegatronOptimizer) -> None:
    """Create ``torch.optim.AdamW`` state (moments and ``step``) before a load.

    ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` reads
    ``state_dict()``, which (without apex or TE) asserts that every parameter
    has one ``step``; a fresh torch optimizer has no state yet. Megatron-Core's
    own ``init_state_fn`` makes the moments but no ``step``.
    """
    for inner in _torch_adams(optimizer):
        inner.init_state_fn(inner.optimizer, inner.config)
        for param_state in inner.optimizer.state.values():
            param_state.setdefault("step", torch.zeros((), dtype=torch.float32))


def saved_adam_steps(optimizer: MegatronOptimizer, loaded: dict) -> list[float | None]:
    """The Adam ``step`` each inner optimizer saved (in its ``param_groups``, non-apex path)."""
    inners = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    parts = [loaded] if len(inners) == 1 else [loaded[i] for i in range(len(inners))]
    steps = []
    for part in parts:
        found = {g["step"] for g in part["optimizer"]["param_groups"] if "step" in g}
        steps.append(float(found.pop()) if len(found) == 1 else None)
    return steps


def restore_adam_steps(optimizer: MegatronOptimizer, steps: list[float | None]) -> None:
    """Give every parameter its own, correct Adam ``step`` tensor after a load.

    Without apex or Transformer Engine, ``DistributedOptimizer.load_state_dict``
    (megatron-core 0.16.1) assigns one shared ``step`` tensor to every
    parameter, which ``torch.optim.AdamW`` then increments once per parameter
    per update, and the ``dp_reshardable`` parameter-state load then copies the
    freshly allocated (zero) ``step`` over it: bias correction restarts and the
    resumed run diverges from the uninterrupted one.
    """
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    for inner, step in zip(inners, steps, strict=True):
        if step is None or not isinstance(inner.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for param_state in inner.optimizer.state.values():
            param_state["step"] = torch.tensor(step, dtype=torch.float32)


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
    state = safe_load.load_sharded({"model": model.sharded_state_dict()}, path)
    model.load_state_dict(state["model"])


def check_pretrained_layout(path: Path, tp: int, pp: int, num_layers: int) -> None:
    """Stop with one line unless a legacy ``release`` at ``path`` has this run's TP, PP and stage split.

    The trainer builds ``num_layers / PP`` layers on every stage; a release
    converted with uneven first/last stages would otherwise fail the strict
    load with a screenful of missing and unexpected keys. ``torch_dist``
    checkpoints are parallelism-independent and pass.
    """
    if ckpt_format.checkpoint_format(path) != "torch":
        return
    tp_ckpt, pp_ckpt = ckpt_format.legacy_layout(path)
    reshard = f"re-shard it with `python -m tools.convert mcore2mcore --tp {tp} --pp {pp}`"
    if (tp_ckpt, pp_ckpt) != (tp, pp):
        raise ConfigError(
            f"{path} was converted for TP={tp_ckpt} PP={pp_ckpt} but this run is TP={tp} PP={pp}; {reshard}"
        )
    stored = ckpt_format.pipeline_layers(path, pp)
    built = [num_layers // pp] * pp
    if stored != built:
        raise ConfigError(
            f"{path} holds {stored} layers per pipeline stage but this run builds {built} "
            f"(num_layers={num_layers}, PP={pp}); {reshard}"
        )


def load_pretrained(path: Path, model, model_cfg: ModelConfig) -> None:
    """Weights only, from a ``tools/convert hf2mcore`` checkpoint converted at this TP/PP."""
    from megatron.core import parallel_state as ps

    pp_size = ps.get_pipeline_model_parallel_world_size()
    check_pretrained_layout(path, ps.get_tensor_model_parallel_world_size(), pp_size, model_cfg.num_layers)
    state, _ = ckpt_format.load_model_for_rank(
        path.parent,
        ps.get_tensor_model_parallel_rank(),
        ps.get_pipeline_model_parallel_rank(),
        pp_size,
        iteration=ckpt_format.iteration_of(path),
        spec="te" if model_cfg.transformer_impl == "transformer_engine" else "local",
        model_config=model_cfg,  # check_architecture matched it to a checkpoint that records none
    )
    model.load_state_dict(state, strict=True)
