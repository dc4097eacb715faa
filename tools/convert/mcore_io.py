"""The one place that knows how Megatron checkpoints lie on disk (converter and trainer share it).

::

    ROOT/latest_checkpointed_iteration.txt      "release" or an iteration number
    ROOT/release/ | ROOT/iter_0000100/           one iteration
        mp_rank_{tp:02d}/model_optim_rng.pt          legacy ``torch`` format, PP = 1
        mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt legacy ``torch`` format, PP > 1
        metadata.json, common.pt, *.distcp          ``torch_dist`` (Megatron-Core dist_checkpointing)
    ROOT/config.json, tokenizer files, ...       HF side files, so an export is a complete HF directory

A legacy rank file is a ``torch.save`` dict: ``model`` (that rank's GPTModel
state dict, layer numbers local to its stage), ``model_config``
(``ModelConfig.to_dict()``), ``checkpoint_version`` (3.0), ``iteration`` and
``pipeline_layers`` (layers per stage). A ``torch_dist`` checkpoint holds
``model`` (``GPTModel.sharded_state_dict()``) plus the common entries
``model_config``, ``iteration`` and ``checkpoint_version``.

Public API: :func:`read_tracker`, :func:`write_tracker`, :func:`iteration_dir_name`,
:func:`iteration_dir`, :func:`resolve`, :func:`rank_dir_name`, :func:`rank_file`,
:func:`checkpoint_format`, :func:`legacy_layout`, :func:`pipeline_layers`, :func:`save_rank`,
:func:`load_rank`, :func:`read_model_config`, :func:`load_model_for_rank`, :func:`atomic_output_dir`,
:func:`save_torch_dist`, :func:`load_torch_dist`, :func:`stop_dist_checkpoint_workers`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_patches import checkpoint_writers, paths, safe_load
from megatron_patches.errors import ConfigError
from megatron_patches.training.model import ModelConfig
from tools.convert import layout
from tools.convert.progress import human_bytes

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
RELEASE = "release"
CHECKPOINT_VERSION = 3.0
FORMATS = ("torch", "torch_dist")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def read_tracker(root: str | Path) -> int | str:
    """The iteration ``ROOT/latest_checkpointed_iteration.txt`` names: an int, or ``"release"``."""
    path = Path(root) / TRACKER_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"{root} is not a Megatron checkpoint: {TRACKER_FILE} not found") from None
    if text == RELEASE:
        return RELEASE
    if not text.isdigit():
        raise ConfigError(f"{path} holds {text!r}, neither an iteration number nor 'release'")
    return int(text)


def write_tracker(root: str | Path, iteration: int | str) -> None:
    """Atomically point ``root``'s tracker at ``iteration``."""
    iteration_dir_name(iteration)  # validates
    tmp = Path(root) / f".{TRACKER_FILE}.tmp"
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, Path(root) / TRACKER_FILE)


def iteration_dir_name(iteration: int | str) -> str:
    if iteration == RELEASE:
        return RELEASE
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ConfigError(f"iteration must be a non-negative int or 'release', got {iteration!r}")
    return f"iter_{iteration:07d}"


def iteration_dir(root: str | Path, iteration: int | str | None = None) -> Path:
    """``root``'s directory for ``iteration`` (default: the tracker's); it must exist."""
    chosen = read_tracker(root) if iteration is None else iteration
    path = Path(root) / iteration_dir_name(chosen)
    if not path.is_dir():
        raise ConfigError(f"checkpoint iteration directory not found: {path}")
    return path


def resolve(path: str | Path, iteration: int | str | None = None) -> tuple[Path, Path]:
    """(root, iteration dir) for a checkpoint root (with a tracker) or for an iteration directory itself."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"Megatron checkpoint directory not found: {path}")
    if (path / TRACKER_FILE).exists() or iteration is not None:
        return path, iteration_dir(path, iteration)
    return path.parent, path


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def rank_file(iter_dir: str | Path, tp_rank: int, pp_rank: int, pp_size: int) -> Path:
    return Path(iter_dir) / rank_dir_name(tp_rank, pp_rank, pp_size) / RANK_FILE


def checkpoint_format(iter_dir: str | Path) -> str:
    """``torch`` (legacy per-rank files) or ``torch_dist``."""
    iter_dir = Path(iter_dir)
    if (iter_dir / "metadata.json").is_file():
        return "torch_dist"
    if any(_RANK_DIR.match(p.name) for p in iter_dir.iterdir() if p.is_dir()):
        return "torch"
    raise ConfigError(f"{iter_dir} holds neither mp_rank_* directories nor a torch_dist checkpoint")


def legacy_layout(iter_dir: str | Path) -> tuple[int, int]:
    """(TP, PP) of a legacy checkpoint, from its rank directories; every rank must be present."""
    ranks = {
        (int(m.group(1)), int(m.group(2) or 0))
        for p in Path(iter_dir).iterdir()
        if (m := _RANK_DIR.match(p.name))
    }
    tp = 1 + max(t for t, _ in ranks)
    pp = 1 + max(p for _, p in ranks)
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            if not rank_file(iter_dir, tp_rank, pp_rank, pp).is_file():
                raise ConfigError(
                    f"incomplete checkpoint: {rank_file(iter_dir, tp_rank, pp_rank, pp)} is missing"
                )
    return tp, pp


def pipeline_layers(iter_dir: str | Path, pp_size: int) -> list[int]:
    """Layers per pipeline stage of a legacy checkpoint, as its rank files record them."""
    state = load_rank(iter_dir, 0, 0, pp_size, mmap=True)
    if "pipeline_layers" not in state:
        raise ConfigError(f"{iter_dir} records no pipeline_layers; it was not written by this project")
    return list(state["pipeline_layers"])


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
    state = {
        "model": model,
        "model_config": model_config.to_dict(),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "pipeline_layers": list(pipeline_layers or [model_config.num_layers]),
    }
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


def load_rank(iter_dir: str | Path, tp_rank: int, pp_rank: int, pp_size: int, mmap: bool = False) -> dict:
    """One legacy rank file, loaded safely (``weights_only``); ``mmap`` reads tensors lazily."""
    path = rank_file(iter_dir, tp_rank, pp_rank, pp_size)
    if not path.is_file():
        raise ConfigError(f"checkpoint rank file not found: {path}")
    state = safe_load.safe_torch_load(path, path, mmap=mmap)
    if not isinstance(state, dict) or "model" not in state:
        raise ConfigError(f"{path} has no 'model' state dict")
    return state


def model_config_of(state: dict, where: str | Path) -> ModelConfig:
    if "model_config" not in state:
        raise ConfigError(f"{where} stores no model_config; it was not written by this project")
    return ModelConfig.from_dict(state["model_config"])


def read_model_config(root: str | Path, iteration: int | str | None = None) -> ModelConfig:
    """The ModelConfig stored in a checkpoint (legacy or torch_dist), without loading weights."""
    iter_dir = iteration_dir(root, iteration)
    if checkpoint_format(iter_dir) == "torch_dist":
        return model_config_of(safe_load.verify_torch_dist(iter_dir).common, iter_dir)
    _, pp = legacy_layout(iter_dir)
    return model_config_of(load_rank(iter_dir, 0, 0, pp, mmap=True), iter_dir)


def load_model_for_rank(
    root: str | Path,
    tp_rank: int,
    pp_rank: int,
    pp_size: int,
    iteration: int | str | None = None,
    spec: str = "local",
) -> tuple[dict[str, Any], ModelConfig]:
    """One rank's ``model`` state dict, named for ``spec`` (``local``/``te``), and its ModelConfig.

    Loads with ``strict=True`` into the GPTModel of that TP/PP rank built from
    the returned config. For starting training from a converted ``release``.
    """
    state = load_rank(iteration_dir(root, iteration), tp_rank, pp_rank, pp_size)
    cfg = model_config_of(state, root)
    tensors = {name: value for key, value in state["model"].items() if (name := layout.from_spec(key))}
    layers = 1 + max((layout.split_layer_name(n) or (-1,))[0] for n in tensors)
    named = {layout.to_spec(name, spec): value for name, value in tensors.items()}
    named.update(layout.extra_state_keys(cfg, layers, "decoder.final_layernorm.weight" in tensors, spec))
    return named, cfg


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it to ``target`` only on success.

    An existing ``target`` is refused unless ``force``; an interrupted or
    failed write leaves no directory that looks complete. The temporary
    directory's name records this host and pid, so that the next run on
    ``target`` removes those of killed runs (and says so).
    """
    target = Path(target)
    if target.exists() and not force:
        raise ConfigError(f"output {target} already exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    _report_stale(paths.clean_stale_temp_dirs(target))
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and lock other
    # users of a shared cluster out of the checkpoint; mkdir honours the umask.
    tmp = paths.owned_temp_dir(target)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, target)


def _report_stale(cleanup: paths.Cleanup) -> None:
    """One line for what a killed conversion left and this run removed; one per leftover it kept."""
    if cleanup.removed:
        names = ", ".join(p.name for p in cleanup.removed)
        print(
            f"removed {len(cleanup.removed)} partial output(s) of killed conversions ({names}) "
            f"in {cleanup.removed[0].parent}, freed {human_bytes(cleanup.freed_bytes)}",
            file=sys.stderr,
        )
    for path, why in cleanup.kept:
        print(f"left partial output {path} ({why}); delete it once its conversion is gone", file=sys.stderr)


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
        state = {
            "model": model.sharded_state_dict(),
            "model_config": cfg.to_dict(),
            "iteration": iteration,
            "checkpoint_version": CHECKPOINT_VERSION,
        }
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
