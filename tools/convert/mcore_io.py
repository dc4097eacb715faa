"""The converter's checkpoint I/O: legacy rank files and streamed ``torch_dist`` saves and loads.

Names, tracker, version, common-state keys and legacy rank-file reading belong
to ``megatron_patches.formats.checkpoint`` (re-exported here for older callers);
this module adds what only the converter does with them::

    ROOT/config.json, tokenizer files, ...       HF side files, so an export is a complete HF directory

A legacy rank file is a ``torch.save`` dict: ``model`` (that rank's GPTModel
state dict, layer numbers local to its stage) plus the common entries of
``CommonState`` with ``pipeline_layers`` (layers per stage). A ``torch_dist``
checkpoint holds ``model`` (``GPTModel.sharded_state_dict()``) plus the common
entries ``model_config``, ``iteration`` and ``checkpoint_version``.

Public API: :func:`save_rank`, :func:`save_torch_dist`, :func:`open_torch_dist`,
:func:`stop_dist_checkpoint_workers`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_patches import safe_load
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
    model_keys,
    rank_dir_name,
    rank_file,
    read_common,
    read_model_config,
    read_tracker,
    resolve,
    write_tracker,
)
from megatron_patches.formats.megatron_lm_args import megatron_lm_args
from megatron_patches.formats.model_config import ModelConfig
from megatron_patches.formats.param_names import spec_name
from tools.convert.rank_stream import StreamedRankFile

if TYPE_CHECKING:  # imported where used: torch.distributed.checkpoint is a third of the CLI's start-up
    from tools.convert import dist_stream


def save_rank(
    iter_dir: str | Path,
    tp_rank: int,
    pp_rank: int,
    pp_size: int,
    model: dict[str, Any] | list[dict[str, Any]],
    model_config: ModelConfig,
    iteration: int = 0,
    pipeline_layers: list[int] | None = None,
    tp_size: int = 1,
    ep_rank: int = 0,
    ep_size: int = 1,
    stream: StreamedRankFile | None = None,
) -> Path:
    """One legacy rank file; ``stream``: the one ``model``'s tensors were added to, which finishes it."""
    path = rank_file(iter_dir, tp_rank, pp_rank, pp_size, ep_rank, ep_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    stages = list(pipeline_layers or [model_config.num_layers])
    chunks = model if isinstance(model, list) else [model]  # Megatron-LM's model0, ... with VPP
    vpp = len(chunks) if len(chunks) > 1 else None
    args = megatron_lm_args(model_config, tp_size, pp_size, vpp)  # for Megatron-LM's --use-checkpoint-args
    common = CommonState(model_config.to_dict(), iteration, pipeline_layers=stages, args=args)
    state = {**dict(zip(model_keys(len(chunks)), chunks, strict=True)), **common.to_dict()}
    if stream is not None:
        stream.close(state)
        return path
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


def save_torch_dist(
    iter_dir: str | Path,
    params: list[tuple[str, tuple[int, ...]]],
    fetch: Callable[[str], torch.Tensor],
    cfg: ModelConfig,
    dtype: torch.dtype,
    iteration: int = 0,
    spec: str = "local",
) -> None:
    """Write a torch_dist checkpoint of the whole (TP=1) model, ``fetch``-ing each tensor as it is written.

    ``params`` are (local name, TP=1 shape) with global layer numbers. Memory: the
    tensor being written (see :mod:`tools.convert.dist_stream`); no model is built. ``spec`` "te": an
    MoE / MLA model's keys as the TE spec's ``sharded_state_dict`` names them (it maps no norm names).
    """
    common = CommonState(cfg.to_dict(), iteration, args=megatron_lm_args(cfg, 1, 1))
    from tools.convert import dist_stream

    te_names = {local: spec_name(local, spec, cfg) for local, _ in params} if spec == "te" else None
    with _without_zip_crc32():  # torch_dist stores each tensor as a torch.save zip too
        dist_stream.save(
            iter_dir, params, fetch, cfg.num_layers, dtype, common.to_dict(), cfg.num_moe_experts, te_names
        )


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


def open_torch_dist(
    iter_dir: str | Path, model_config: ModelConfig | None = None
) -> tuple[dist_stream.DistReader, ModelConfig, int | str]:
    """A reader of the whole model's (TP=1) tensors of a torch_dist checkpoint written at any TP/PP.

    Megatron-LM's checkpoints read through their ``args``; ``model_config`` stands
    in for a checkpoint that records no architecture at all (``--model-config``).

    Nothing is read until asked for, one tensor (one layer's piece) at a time, at the
    stored dtype. Vocabulary rows are those of a TP=1 model (padded to
    ``make_vocab_size_divisible_by``).
    """
    from tools.convert import dist_stream

    vetted = safe_load.verify_torch_dist(iter_dir)
    cfg = model_config_of(vetted.common, iter_dir, model_config)
    # A trainer checkpoint also holds the optimizer's fp32 main params and moments: not the model's dtype.
    dtypes = vetted.tensor_dtypes().items()
    stored = {dtype for key, dtype in dtypes if key.startswith(dist_stream.MODEL_PREFIXES)}
    # One dtype in a model trained with Float16Module; a mix is read exactly in fp32.
    dtype = stored.pop() if len(stored) == 1 else torch.float32
    reader = dist_stream.DistReader(iter_dir, dtype, cfg.padded_vocab_size(1))
    return reader, cfg, vetted.common.get("iteration", 0)
