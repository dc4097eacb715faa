"""Going back: resume from an older checkpoint, skip data windows, roll back in-process.

* ``checkpoint.load_iteration=N`` (:func:`resume_point`): resume from ``iter_N`` of
  ``checkpoint.load`` (or ``save``) instead of the tracker's newest. Its checkpoints record
  ``branched_from: N``, so a relaunch with the same config (torchrun ``--max-restarts``, a
  Slurm requeue) continues the new branch instead of going back again.
* ``data.skip_samples`` (:func:`planned_windows`): windows of sample ids never read; a
  resume adds them to those its checkpoint recorded. A new window may only cover data the
  run has not read yet: one behind the resume position would move the position of data
  already trained on, so it is refused.
* :func:`roll_back` (a hook's ``Requests.rollback``): reload the newest checkpoint (at least
  ``Rollback.lookback`` iterations before the anomaly: :func:`target`) in this process (model,
  optimizer, scheduler, RNG, patch state), skip the samples read since it (plus a margin), log
  the decision to ``<run_dir>/rollbacks.jsonl`` and TensorBoard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats import checkpoint as ckpt_format
from megatron_patches.hooks import Rollback, phase_model_config
from megatron_patches.training import checkpoint, skip_windows
from megatron_patches.training.data import Phase, phase_at, phase_sample_offset

if TYPE_CHECKING:
    from megatron_patches.hooks import Hook
    from megatron_patches.training.loop import TrainContext

LOG_FILE = "rollbacks.jsonl"


def resume_point(root: Path, save_dir: Path, iteration: int, keep_last: int) -> Path:
    """The checkpoint ``checkpoint.load_iteration=iteration`` resumes from; one line when it cannot."""
    newer = [it for it, _ in ckpt_format.complete_iterations(save_dir) if it > iteration]
    own = ckpt_format.latest(save_dir) if newer else None
    if own is not None and checkpoint.saved_lineage(own)[1] == iteration:
        return own  # a relaunch of the branch that already went back to `iteration`
    path = root / ckpt_format.iteration_dir_name(iteration)
    available = [it for it, _ in ckpt_format.complete_iterations(root)]
    if not path.is_dir():
        raise ConfigError(
            f"checkpoint.load_iteration={iteration}: {root} has no checkpoint of that iteration "
            f"(it has {available or 'none'}; checkpoint.keep_last={keep_last} deletes older ones)"
        )
    if newer:
        raise ConfigError(
            f"checkpoint.load_iteration={iteration}: {save_dir} holds later checkpoints {newer} of the run "
            f"being abandoned, which the new branch would mix with; keep them and write the new branch "
            f"elsewhere: checkpoint.load={root} checkpoint.save=<a new directory>"
        )
    return path


def planned_windows(configured: list, resume_from: Path | None, phases: list[Phase]) -> list:
    """The run's skipped windows: ``data.skip_samples`` and the resumed checkpoint's; one line if a
    new window lies behind the resume position (that data was already read)."""
    windows = skip_windows.parse(configured)
    if resume_from is None:
        return windows
    saved = skip_windows.parse(checkpoint.saved_lineage(resume_from)[0], f"checkpoint {resume_from}")
    iteration = checkpoint.saved_progress(resume_from).iteration
    current = phase_at(phases, iteration)
    ended = {p.name for p in phases if p.end_iteration <= iteration}
    position = phase_sample_offset(phases, iteration)
    reached = skip_windows.dataset_index(position, skip_windows.of_phase(saved, current.name))
    for window in windows:
        if window in saved:
            continue
        start, _, name = window
        if name in ended or (name == current.name and start < reached):
            raise ConfigError(
                f"data.skip_samples: {list(window)} starts before sample {reached} of phase "
                f"{current.name!r}, where the resume from {resume_from} continues; that data was already "
                "trained on (go back first with checkpoint.load_iteration)"
            )
    return skip_windows.merge(saved + windows)


def target(save_dir: Path, anomaly: int, lookback: int) -> Path | None:
    """The checkpoint a roll-back at iteration ``anomaly`` reloads: the newest of ``save_dir`` saved
    before it and at least ``lookback`` iterations older (Trainer._keep_from keeps it from pruning)."""
    newest = anomaly - max(1, lookback)
    older = [path for it, path in ckpt_format.complete_iterations(save_dir) if it <= newest]
    return older[-1] if older else None


def roll_back(ctx: TrainContext, hooks: list[Hook], save_dir: Path, request: Rollback) -> dict | None:
    """Reload the checkpoint :func:`target` picks and skip what was read since; None if there is none.

    Collective: every rank calls it after the same iteration (requests are agreed).
    """
    anomaly = ctx.state.iteration
    path = target(save_dir, anomaly, request.lookback)
    if path is None:
        return None
    target_iteration = int(ckpt_format.iteration_of(path))
    windows = []
    if request.skip_margin is not None:
        windows = ctx.data.read_windows(target_iteration, anomaly, request.skip_margin)
        ctx.data.skip(windows)
    model_cfg = phase_model_config(hooks, phase_at(ctx.data.phases, target_iteration), ctx.cfg.model)
    objs = ctx.objects
    loaded = checkpoint.load(path, objs.gpt, objs.optimizer, objs.scheduler, model_cfg)
    ctx.state.iteration, ctx.state.consumed_samples = loaded.iteration, loaded.consumed_samples
    if torch.distributed.get_rank() == 0:  # a relaunch now resumes here, not from a newer abandoned one
        ckpt_format.write_tracker(save_dir, target_iteration)
    for hook in hooks:
        hook.load_state_dict((loaded.patch_state or {}).get(hook.name, {}))
    ctx.data.skip([tuple(w) for w in skip_windows.parse(loaded.skip_samples or [], str(path))])
    ctx.state.skip_samples = skip_windows.to_json(ctx.data.skipped)
    ctx.phase = None  # re-enter the phase: its datasets must reach past the new windows
    record = {
        "iteration": anomaly,
        "reason": request.reason,
        "checkpoint_iteration": target_iteration,
        "checkpoint": str(path),
        "skipped": skip_windows.to_json(windows),
        "skipped_samples": skip_windows.skipped_count([(s, e) for s, e, _ in windows]),
    }
    ctx.writer.rolled_back(target_iteration, anomaly)
    _log(ctx, record)
    return record


def _log(ctx: TrainContext, record: dict) -> None:
    """A JSON line per roll-back (flushed and synced: a crash right after keeps it), TensorBoard, console."""
    writer = ctx.writer
    if not writer.enabled:
        return
    with (Path(ctx.run_dir) / LOG_FILE).open("a") as out:
        out.write(json.dumps(record) + "\n")
        out.flush()
        os.fsync(out.fileno())
    scalars = {"rollback/to_iteration": record["checkpoint_iteration"]}
    writer.scalars({**scalars, "rollback/skipped": record["skipped_samples"]}, record["iteration"])
    writer.console(
        f"roll-back at iteration {record['iteration']} ({record['reason']}): "
        f"reloaded {record['checkpoint']}, skipping samples {record['skipped']}"
    )
