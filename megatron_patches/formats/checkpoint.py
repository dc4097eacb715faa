"""The Megatron checkpoint format: the one module that knows how checkpoints lie on disk.

The trainer (``megatron_patches.training.checkpoint``) and the converter
(``tools.convert.mcore_io``) both read and write through it::

    ROOT/latest_checkpointed_iteration.txt      "release" or an iteration number, replaced last
    ROOT/release/ | ROOT/iter_0000100/           one iteration
        mp_rank_{tp:02d}/model_optim_rng.pt          legacy ``torch`` format, PP = 1
        mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt legacy ``torch`` format, PP > 1
        metadata.json, common.pt, *.distcp          ``torch_dist`` (Megatron-Core dist_checkpointing)
    ROOT/.iter_0000100.partial-<host>-<pid>-<hex>/  a save in progress, or a killed one's: nothing reads it
    ROOT/.iter_0000100.old-<host>-<pid>-<hex>/      the iteration a save of it again replaced (removed after)

Every checkpoint stores the common entries of :class:`CommonState`
(``model_config``, ``iteration``, ``checkpoint_version``, Megatron-LM's ``args``
namespace and, from the trainer, consumed samples, the parallel layout, run
settings and patch state); a legacy rank file holds them beside its ``model``
state dict. Megatron-LM's own checkpoints (same layout, no ``model_config``)
read through their ``args`` (``formats.megatron_lm_args``). The legacy rank grid
lives in ``formats.legacy_ranks``, re-exported here. Reads go through
``megatron_patches.safe_load``; nothing here imports Megatron-Core.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_patches import paths, safe_load
from megatron_patches.errors import ConfigError
from megatron_patches.formats import megatron_lm_args, param_names
from megatron_patches.formats.legacy_ranks import (  # noqa: F401  (re-exported: the format's API)
    MODEL,
    PIPELINE_LAYERS,
    RANK_FILE,
    chunk_model,
    is_rank_dir_name,
    legacy_grid,
    legacy_layout,
    load_rank,
    model_chunk_count,
    model_keys,
    pipeline_layers,
    rank_dir_name,
    rank_file,
    virtual_stage,
)
from megatron_patches.formats.megatron_lm_args import ARGS
from megatron_patches.formats.model_config import ModelConfig

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
CHECKPOINT_VERSION = 3.0
FORMATS = ("torch", "torch_dist")
DIST_MARKER = "metadata.json"  # written by dist_checkpointing.save into every torch_dist checkpoint
_ITERATION_DIR = re.compile(r"^iter_(\d{7,})$")
_SAVE_TEMP = re.compile(r"^\.(?P<name>iter_\d{7,})\.partial-")
_OLD_COPY = re.compile(r"^\.(?P<name>iter_\d{7,})\.old-")  # paths.commit_atomic_dir's replaced one
_PRE_ATOMIC_SAVE = re.compile(r"^iter_\d{7,}\.tmp$")  # a save's directory before saves were atomic
_PRE_ATOMIC_WHY = "a save interrupted before saves were atomic: nothing reads it, delete it"

# Keys of the common (unsharded) state.
ITERATION = "iteration"
CONSUMED_SAMPLES = "consumed_samples"
VERSION = "checkpoint_version"
MODEL_CONFIG = "model_config"  # ModelConfig.to_dict()
PARALLEL_LAYOUT = "parallel_layout"  # [TP, PP] of the run that wrote the checkpoint
DATA_PARALLEL_SIZE = "data_parallel_size"  # DP of the run that wrote it (the resume log names it)
RUN_SETTINGS = "run_settings"  # seed, data, tokenizer ... of the run that wrote it
PATCH_STATE = "patch_state"  # the patches' own state, by patch name
SKIP_SAMPLES = "skip_samples"  # [[first id, last id, phase], ...] the run never reads (roll-backs)
BRANCHED_FROM = "branched_from"  # the checkpoint.load_iteration the run went back to, if any


@dataclass
class CommonState:
    """The entries every checkpoint stores beside its tensors; None means "not recorded"."""

    model_config: dict[str, Any]
    iteration: int | str = 0
    consumed_samples: int | None = None
    parallel_layout: list[int] | None = None
    data_parallel_size: int | None = None
    run_settings: dict | None = None
    patch_state: dict | None = None
    pipeline_layers: list[int] | None = None
    skip_samples: list | None = None
    branched_from: int | None = None
    args: Any = None  # Megatron-LM's argparse.Namespace, for its --use-checkpoint-args

    def to_dict(self) -> dict[str, Any]:
        """The entries to save, with this format's :data:`CHECKPOINT_VERSION`."""
        recorded = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return {**recorded, VERSION: CHECKPOINT_VERSION}

    @classmethod
    def from_dict(
        cls, common: dict[str, Any], where: str | Path, model_config: ModelConfig | None = None
    ) -> CommonState:
        """The entries of a loaded common state; see :func:`architecture` for a foreign one's model config."""
        names = {f.name for f in dataclasses.fields(cls)}
        entries = {k: v for k, v in common.items() if k in names}
        if MODEL_CONFIG not in entries:  # Megatron-LM's own, or a checkpoint recording no architecture
            entries[MODEL_CONFIG] = architecture(common, where, model_config).to_dict()
        return cls(**entries)


def architecture(common: dict[str, Any], where: str | Path, given: ModelConfig | None = None) -> ModelConfig:
    """The model config of a checkpoint: this project's ``model_config``, else Megatron-LM's ``args``.

    ``given`` (``--model-config`` / ``checkpoint.pretrained_model_config``) stands in for a
    checkpoint that records neither, e.g. one written by a script that dropped ``args``.
    """
    if MODEL_CONFIG in common:
        return ModelConfig.from_dict(common[MODEL_CONFIG])
    if common.get(ARGS) is not None:
        return megatron_lm_args.model_config_from_args(common[ARGS], where)
    if given is not None:
        return given
    raise ConfigError(
        f"{where} records neither model_config nor Megatron-LM args; "
        f"give the architecture with {megatron_lm_args.SUPPLY}"
    )


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
    paths.write_text_atomic(Path(root) / TRACKER_FILE, f"{iteration}\n")


def iteration_dir_name(iteration: int | str) -> str:
    """``iter_0000100`` for 100, ``release`` for ``"release"``."""
    if iteration == RELEASE:
        return RELEASE
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ConfigError(f"iteration must be a non-negative int or 'release', got {iteration!r}")
    return f"iter_{iteration:07d}"


def iteration_of(iter_dir: str | Path) -> int | str:
    """The iteration an ``iter_XXXXXXX`` or ``release`` directory holds."""
    name = Path(iter_dir).name
    if name == RELEASE:
        return RELEASE
    match = _ITERATION_DIR.match(name)
    if match is None:
        raise ConfigError(f"{iter_dir} is named neither iter_XXXXXXX nor {RELEASE}")
    return int(match[1])


def is_iteration_dir(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint iteration (``iter_XXXXXXX`` or ``release``) in either format."""
    path = Path(path)
    if not (path.name == RELEASE or _ITERATION_DIR.match(path.name)) or not path.is_dir():
        return False
    return (path / DIST_MARKER).is_file() or any(is_rank_dir_name(p.name) for p in path.iterdir())


def iteration_dir(root: str | Path, iteration: int | str | None = None) -> Path:
    """``root``'s directory for ``iteration`` (default: the tracker's); it must exist."""
    chosen = read_tracker(root) if iteration is None else iteration
    path = Path(root) / iteration_dir_name(chosen)
    if not path.is_dir():
        raise ConfigError(f"checkpoint iteration directory not found: {path}")
    return path


def latest(root: str | Path | None) -> Path | None:
    """The directory the tracker in ``root`` points at, or None when ``root`` has no tracker."""
    if root is None or not (Path(root) / TRACKER_FILE).is_file():
        return None
    return iteration_dir(root)


def resolve(path: str | Path, iteration: int | str | None = None) -> tuple[Path, Path]:
    """(root, iteration dir) for a checkpoint root (with a tracker) or for an iteration directory itself."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"Megatron checkpoint directory not found: {path}")
    if (path / TRACKER_FILE).exists() or iteration is not None:
        return path, iteration_dir(path, iteration)
    return path.parent, path


def complete_iterations(root: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, directory)`` of every ``iter_XXXXXXX`` directory in ``root``, oldest first.

    Saves in progress live in hidden temporary directories, so every one listed is complete.
    """
    found = []
    for path in Path(root).iterdir() if Path(root).is_dir() else []:
        match = _ITERATION_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match[1]), path))
    return sorted(found)


def prune(root: str | Path, keep_last: int, keep_from: int | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the tracked one); say which.

    ``keep_from``: keep also the newest checkpoint at or before that iteration and all newer ones
    (all of them when none is that old): those a roll-back with a look-back may reload.
    """
    if keep_last <= 0:
        return []
    tracked = read_tracker(root)
    found = complete_iterations(root)
    if keep_from is None:
        oldest_needed = float("inf")
    else:  # -1 when none is that old: keep them all
        oldest_needed = max((it for it, _ in found if it <= keep_from), default=-1)
    doomed = [path for it, path in found[:-keep_last] if it != tracked and it < oldest_needed]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def clean_stale_saves(root: str | Path) -> paths.Cleanup:
    """Remove the temporary directories of saves into ``root`` whose writer is gone; report the rest."""
    root = Path(root)
    names = sorted({m["name"] for p in root.glob(".iter_*") if (m := _SAVE_TEMP.match(p.name))})
    total = paths.Cleanup()
    for name in names:
        _add_cleanup(total, paths.clean_stale_temp_dirs(root / name))
    return total


def clean_leftovers(root: str | Path) -> paths.Cleanup:
    """Remove what earlier saves into ``root`` left that nobody needs; report what stays, and why.

    * ``.iter_X.old-<owner>``: the previous ``iter_X``, moved aside when iteration X was saved again
      (``paths.commit_atomic_dir``). With ``iter_X`` back in place and its writer gone, it is a
      superseded copy: removed. Without ``iter_X`` (its writer was killed between the two renames),
      it is the last complete copy of X: kept.
    * ``iter_X.tmp``: a save interrupted under a version before saves were atomic. Its name records
      no writer, so it stays, as ``paths.clean_stale_temp_dirs`` keeps such directories.

    For rank 0 before the run's first save (the trainer calls it at start).
    """
    root, total = Path(root), paths.Cleanup()
    if not root.is_dir():
        return total
    for path in sorted(root.iterdir()):
        if _PRE_ATOMIC_SAVE.match(path.name) and path.is_dir():
            total.kept.append((path, _PRE_ATOMIC_WHY))
    for name in sorted({m["name"] for p in root.iterdir() if (m := _OLD_COPY.match(p.name))}):
        if (root / name).is_dir():
            _add_cleanup(total, paths.clean_stale_temp_dirs(root / name, "old"))
            continue
        why = f"{name} is missing and this is its last complete copy: rename it {name}"
        total.kept += [(path, why) for path in sorted(root.glob(f".{name}.old-*")) if path.is_dir()]
    return total


def describe_leftovers(root: str | Path, cleanup: paths.Cleanup) -> str | None:
    """One line naming what :func:`clean_leftovers` removed and kept; None when it found nothing."""
    parts = []
    if cleanup.removed:
        names = ", ".join(path.name for path in cleanup.removed)
        copies = "a superseded copy" if len(cleanup.removed) == 1 else "superseded copies"
        parts.append(f"removed {names} ({copies}; {paths.human_bytes(cleanup.freed_bytes)} freed)")
    parts += [f"kept {path.name} ({why})" for path, why in cleanup.kept]
    return f"checkpoint leftovers in {root}: " + "; ".join(parts) if parts else None


def _add_cleanup(total: paths.Cleanup, one: paths.Cleanup) -> None:
    total.removed += one.removed
    total.freed_bytes += one.freed_bytes
    total.kept += one.kept


def checkpoint_format(iter_dir: str | Path) -> str:
    """``torch`` (legacy per-rank files) or ``torch_dist``."""
    iter_dir = Path(iter_dir)
    if (iter_dir / DIST_MARKER).is_file():
        return "torch_dist"
    if any(is_rank_dir_name(p.name) for p in iter_dir.iterdir() if p.is_dir()):
        return "torch"
    raise ConfigError(f"{iter_dir} holds neither mp_rank_* directories nor a torch_dist checkpoint")


def read_common(iter_dir: str | Path, model_config: ModelConfig | None = None) -> CommonState:
    """The common state of a checkpoint iteration (legacy or torch_dist), without loading weights."""
    return CommonState.from_dict(_stored_common(Path(iter_dir)), iter_dir, model_config)


def records_vocabulary(iter_dir: str | Path) -> bool:
    """Whether it records its tokenizer's vocabulary size (Megatron-LM's args hold only the padded one)."""
    return MODEL_CONFIG in _stored_common(Path(iter_dir))


def _stored_common(iter_dir: Path) -> dict[str, Any]:
    if checkpoint_format(iter_dir) == "torch_dist":
        return safe_load.load_common(iter_dir)
    _, pp, ep = legacy_grid(iter_dir)
    return load_rank(iter_dir, 0, 0, pp, mmap=True, ep_size=ep)


def model_config_of(state: dict, where: str | Path, model_config: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of a loaded common state or legacy rank file; see :func:`architecture`."""
    return architecture(state, where, model_config)


def read_model_config(
    root: str | Path, iteration: int | str | None = None, model_config: ModelConfig | None = None
) -> ModelConfig:
    """The ModelConfig of a checkpoint (legacy or torch_dist), without loading weights."""
    return ModelConfig.from_dict(read_common(iteration_dir(root, iteration), model_config).model_config)


def load_model_for_rank(
    root: str | Path,
    tp_rank: int,
    pp_rank: int,
    pp_size: int,
    iteration: int | str | None = None,
    spec: str = "local",
    model_config: ModelConfig | None = None,
    ep_rank: int = 0,
    ep_size: int = 1,
    chunk: int = 0,
) -> tuple[dict[str, Any], ModelConfig]:
    """One legacy rank's ``model`` state dict (of virtual pipeline ``chunk``: ``model0``, ... with VPP),
    named for ``spec`` (``local``/``te``), and its ModelConfig.

    Loads with ``strict=True`` into the GPTModel of that TP/PP(/EP) rank built from
    the returned config. For starting training from a converted ``release``.
    """
    state = load_rank(
        iteration_dir(root, iteration), tp_rank, pp_rank, pp_size, ep_rank=ep_rank, ep_size=ep_size
    )
    cfg = model_config_of(state, root, model_config)
    model = chunk_model(state, chunk)
    tensors = {name: value for key, value in model.items() if (name := param_names.from_spec(key))}
    layers = 1 + max((param_names.split_layer_name(n) or (-1,))[0] for n in tensors)
    named = {param_names.to_spec(name, spec): value for name, value in tensors.items()}
    last_stage = param_names.FINAL_NORM in tensors
    named.update(param_names.extra_state_keys(cfg, layers, last_stage, spec, tensors))
    return named, cfg
