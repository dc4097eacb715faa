"""A test-only patch that watches a real training run from inside, and a runner that plugs it in.

``train_with_probe(args, inject)`` runs the trainer on this rank with the
``probe`` patch registered (configure it with ``patches.probe={...}`` after the
patches under test, so its hooks run after theirs) and returns
``(exit code, record)``. The probe records, per rank:

* ``phases``: at each phase start, the iteration, sequence length, rotary base,
  and the rotary embedding the model computes for ``emb_length`` positions
  (called as ``GPTModel`` calls it, so a stale ``lru_cache`` entry would show);
* ``shapes``: per iteration (1-based), the per-token loss shapes of its
  micro-batches (last pipeline stage);
* ``fingerprint``: per iteration, a float64 sum over this rank's parameters;
* ``saves``: the iterations at which a checkpoint completed.

Option ``touch: {iteration: file name}`` makes the last rank create that file
in the run directory after that iteration's hooks ran; ``touch_during_save``
names an iteration whose checkpoint gets a file touched while it is written.
``signal: {iteration: [rank, name]}`` makes that rank send itself that signal
(e.g. SIGTERM) after that iteration's hooks ran.
``inject`` (``{iteration: factor}``) multiplies that iteration's token losses,
to make a loss spike (or a NaN) through the real backward pass.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

from megatron_patches import hooks
from megatron_patches.hooks import Hook

RECORD: dict = {"phases": [], "shapes": {}, "fingerprint": {}, "saves": []}


@dataclass(frozen=True)
class Options:
    touch: dict | None = None  # iteration -> file name in run_dir
    touch_during_save: list | None = None  # [iteration, file name]
    emb_length: int = 32
    signal: dict | None = None  # iteration -> [rank, signal name]


class Probe(Hook):
    name = "probe"

    def __init__(self, options: Options) -> None:
        self.touch = {int(k): v for k, v in (options.touch or {}).items()}
        self.touch_during_save = options.touch_during_save
        self.emb_length = options.emb_length
        self.signal = {int(k): v for k, v in (options.signal or {}).items()}

    def on_train_start(self, ctx) -> None:
        RECORD["fingerprint"][ctx.state.iteration] = _fingerprint(ctx.objects.gpt)
        if self.touch_during_save:
            _touch_during_save(ctx, *self.touch_during_save)

    def on_phase_start(self, ctx, phase) -> None:
        rope = ctx.objects.gpt.rotary_pos_emb
        emb = rope(self.emb_length, packed_seq=False, cp_group=None)  # GPTModel's call, same cache key
        RECORD["phases"].append(
            {
                "iteration": ctx.state.iteration,
                "seq_length": phase.seq_length,
                "rotary_base": ctx.objects.gpt.rotary_base,  # what the model uses now
                "global_batch_size": phase.global_batch_size,
                "inv_freq": rope.inv_freq.clone(),
                "emb": emb.clone(),
            }
        )

    def on_micro_batch_loss(self, ctx, token_losses, loss_mask, batch, training: bool) -> None:
        if training:
            RECORD["shapes"].setdefault(ctx.state.iteration + 1, []).append(tuple(token_losses.shape))

    def after_step(self, ctx, report, requests) -> None:
        RECORD["fingerprint"][report.iteration] = _fingerprint(ctx.objects.gpt)
        if report.iteration in self.touch and _is_last_rank():
            (ctx.run_dir / self.touch[report.iteration]).touch()
        rank, name = self.signal.get(report.iteration, (None, None))
        if rank == torch.distributed.get_rank():
            os.kill(os.getpid(), getattr(signal, name))

    def after_save(self, ctx, path) -> None:
        RECORD["saves"].append(ctx.state.iteration)


def _is_last_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _fingerprint(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _touch_during_save(ctx, iteration: int, name: str) -> None:
    """Wrap the checkpoint writer: the last rank touches ``name`` as the save of ``iteration`` begins."""
    from megatron_patches.training import checkpoint

    original = checkpoint.save

    def save(*args, **kwargs):
        if ctx.state.iteration == iteration and _is_last_rank():
            (ctx.run_dir / name).touch()
        return original(*args, **kwargs)

    checkpoint.save = save


def tensorboard_scalars(run_dir, tag: str) -> dict[int, float]:
    """``{step: value}`` of one TensorBoard tag, read back from the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def enable(options: Options, config) -> Probe:
    return Probe(options)


def _inject(factors: dict[int, float]) -> None:
    from megatron_patches.training import step

    original = step.loss_func

    def loss_func(hook_list, ctx, batch, training, token_losses):
        factor = factors.get(ctx.state.iteration + 1) if training else None
        if factor is not None:
            token_losses = token_losses * factor
        return original(hook_list, ctx, batch, training, token_losses)

    step.loss_func = loss_func


def train_with_probe(args: list[str], inject: dict[int, float] | None = None) -> tuple[int, dict]:
    from megatron_patches.training import run

    hooks.PATCHES["probe"] = __name__
    if inject:
        _inject(inject)
    code = run.main(args)
    return code, RECORD
