"""The converter's checkpoint I/O: legacy rank files and whole-model ``torch_dist`` saves and loads.

Names, tracker, version, common-state keys and legacy rank-file reading belong
to ``megatron_patches.formats.checkpoint`` (re-exported here for older callers);
this module adds what only the converter does with them::

    ROOT/config.json, tokenizer files, ...       HF side files, so an export is a complete HF directory

A legacy rank file is a ``torch.save`` dict: ``model`` (that rank's GPTModel
state dict, layer numbers local to its stage) plus the common entries of
``CommonState`` with ``pipeline_layers`` (layers per stage). A ``torch_dist``
checkpoint holds ``model`` (``GPTModel.sharded_state_dict()``) plus the common
entries ``model_config``, ``iteration`` and ``checkpoint_version``.

Public API: :func:`save_rank`, :func:`save_torch_dist`, :func:`load_torch_dist`,
:func:`stop_dist_checkpoint_workers`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_patches import checkpoint_writers, safe_load
from megatron_patches.errors import ConfigError
from megatron_patches.formats.checkpoint import (  # noqa: F401  (re-exported: older callers name them here)
    FORMATS,
    RANK_FILE,
    RELEASE,
    TRACKER_FILE,
    CommonState,
    checkpoint_format,
    iteration_dir,
    iteration_dir_name,
    legacy_layout,
    load_model_for_rank,
    load_rank,
    model_config_of,
    rank_dir_name,
    rank_file,
    read_common,
    read_model_config,
    read_tracker,
    resolve,
    write_tracker,
)
from megatron_patches.formats.model_config import ModelConfig


def save_rank(
    iter_dir: str | Path,
    tp_rank: int,
    pp_rank: int,
    pp_size: int,
    model: dict[str, Any],
    model_config: ModelConfig,
    iteration: int = 0,
    pipeline_layers: list[int] | None = None,
) -> Path:
    path = rank_file(iter_dir, tp_rank, pp_rank, pp_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    stages = list(pipeline_layers or [model_config.num_layers])
    common = CommonState(model_config.to_dict(), iteration, pipeline_layers=stages)
    state = {"model": model, **common.to_dict()}
    with _without_zip_crc32():
        torch.save(state, path)
    return path


@contextlib.contextmanager
def _without_zip_crc32() -> Iterator[None]:
    """Skip torch.save's zip CRC32: torch.load never checks it, and it costs more CPU than the write."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch < 2.6 always computes it
        yield
        return
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


@contextlib.contextmanager
def _single_rank_megatron(cfg: ModelConfig) -> Iterator[None]:
    """Megatron-Core's parallel state for one CPU process (TP=PP=1), for torch_dist I/O."""
    from megatron.core import parallel_state

    from megatron_patches import cpu, parallel

    cpu.enable()
    owned = not torch.distributed.is_initialized()
    if owned:
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        parallel.initialize(parallel.Layout(1, 1, 1), seed=0, model=cfg)
        yield
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if owned:
            torch.distributed.destroy_process_group()


def _whole_model(cfg: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The TP=1/PP=1 GPTModel (local spec, uninitialized memory) whose sharded state dict is the format."""
    from megatron_patches.training.model import build_model_for_this_rank

    local = dataclasses.replace(cfg, transformer_impl="local")
    model = build_model_for_this_rank(local, dtype, perform_initialization=False, use_cpu_initialization=True)
    return model.to(dtype)  # norms too, as Megatron's Float16Module holds them when training in bf16/fp16


def _fill(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy streamed ``(name, tensor)`` pairs into ``model``; every parameter must get one."""
    params = model.state_dict(keep_vars=True)
    filled = set()
    for name, tensor in tensors:
        if name.endswith("._extra_state"):
            continue
        with torch.no_grad():
            params[name].copy_(tensor)
        filled.add(name)
    unfilled = [n for n in params if n not in filled and not n.endswith("._extra_state")]
    if unfilled:
        raise ConfigError(f"no tensor for {unfilled[0]} while writing torch_dist")


def save_torch_dist(
    iter_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    cfg: ModelConfig,
    dtype: torch.dtype,
    iteration: int = 0,
) -> None:
    """Write a torch_dist checkpoint from the whole model's (TP=1) state, streamed tensor by tensor.

    Memory: the whole model once, at ``dtype`` (dist_checkpointing saves one state dict).
    """
    from megatron.core import dist_checkpointing

    with _single_rank_megatron(cfg):
        model = _whole_model(cfg, dtype)
        _fill(model, tensors)
        Path(iter_dir).mkdir(parents=True, exist_ok=True)
        state = {"model": model.sharded_state_dict(), **CommonState(cfg.to_dict(), iteration).to_dict()}
        checkpoint_writers.bind_to_this_process()  # a killed conversion leaves no writer behind
        dist_checkpointing.save(state, str(iter_dir))
        stop_dist_checkpoint_workers()


def stop_dist_checkpoint_workers() -> None:
    """Stop the Manager process Megatron-Core's torch_dist writer keeps for its results queue.

    ``dist_checkpointing.save`` spawns it once per process and relies on a
    normal interpreter exit to stop it; a process that is killed instead
    orphans it, still holding the parent's stdout. One-off savers call this.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = getattr(filesystem_async, "_results_queue", None)
    manager = getattr(queue, "_manager", None)
    if manager is not None:
        manager.shutdown()
        filesystem_async._results_queue = None


def load_torch_dist(iter_dir: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, int | str]:
    """The whole model's (TP=1) state dict of a torch_dist checkpoint written at any TP/PP.

    Memory: the whole model once, at its stored dtype. Vocabulary rows are
    those of a TP=1 model (padded to ``make_vocab_size_divisible_by``).
    """
    vetted = safe_load.verify_torch_dist(iter_dir)
    cfg = model_config_of(vetted.common, iter_dir)
    # A trainer checkpoint also holds the optimizer's fp32 main params and moments: not the model's dtype.
    stored = {dtype for key, dtype in vetted.tensor_dtypes().items() if not key.startswith("optimizer.")}
    # One dtype in a model trained with Float16Module; a mix is read exactly in fp32.
    dtype = stored.pop() if len(stored) == 1 else torch.float32
    with _single_rank_megatron(cfg):
        model = _whole_model(cfg, dtype)
        loaded = safe_load.load_sharded({"model": model.sharded_state_dict()}, iter_dir)
    tensors = {k: v for k, v in loaded["model"].items() if isinstance(v, torch.Tensor)}
    return tensors, cfg, vetted.common.get("iteration", 0)
