"""Channel loss: the loss of every data source (blend component), logged separately.

What it changes in Megatron-Core's behaviour: ``GPTModel`` returns per-token
losses, and Megatron's ``loss_func`` (ours in ``training/step.py`` as well)
reduces each micro-batch to one sum before the pipeline schedule sees it; the
blend identity of each sample (``BlendedDataset``'s ``dataset_id``) is dropped,
so Megatron-LM logs only the blended ``lm loss``. Here, on the last pipeline
stage, each micro-batch's per-token losses are also summed per channel from the
samples' ``dataset_id`` (channel names: ``data.channels`` or the prefix
basename, per phase, so an anneal blend has its own). Why: in domain
pretraining the blended curve hides the see-saw between sources (zh, en, code).

Where the numbers come from and go:

* Every rank reads the full batch (the trainer does not broadcast data), so the
  TP ranks of the last stage already hold ``dataset_id``: nothing is broadcast.
  All TP ranks compute the same per-token losses (vocab-parallel cross entropy
  is reduced over TP) and do the same sums.
* Sums stay local, on the device, with no host sync. A micro-batch's detached
  per-token losses are kept (by reference) until the log (or until
  ``MAX_HELD_MICRO_BATCHES`` are held); then one concatenation sums all of
  them, so the cost is a few tensor ops per log window however many
  micro-batches it has. An iteration's losses join the log window only if the
  iteration's global loss is finite, the rule the loop's ``lm loss`` window
  uses.
* At ``log_interval`` (never per micro-batch), each last-stage rank's
  ``{channel: (loss sum, tokens)}`` is exchanged with ``all_gather_object`` over
  the data-parallel group of the last stage (including context-parallel ranks,
  whose partial sums over their sequence slices then add up; this trainer runs
  CP = 1). Ranks that saw different channels, or none, still agree. The logging
  rank (the last global rank) is a last-stage rank, so it has the reduced
  result without another transfer.
* TensorBoard: ``channel_loss/<name>`` (token-weighted mean since the last log)
  and ``channel_tokens/<name>`` for every channel with tokens in the window; the
  token-weighted mean of the channel losses is the window's ``lm loss``.
  Validation adds ``channel_val_loss/<name>``.

This patch calls no Megatron-Core function itself; the group it gathers over
comes from :func:`megatron_patches.parallel.gather_on_last_stage`, which checks
the pinned signature of ``parallel_state.get_data_parallel_group``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megatron_patches.hooks import Hook, HookContext, PhaseInfo, Requests, StepReport
from megatron_patches.parallel import gather_on_last_stage

if TYPE_CHECKING:
    from megatron_patches.training.config import Config as TrainConfig


@dataclass(frozen=True)
class Options:
    """``patches.channel_loss`` has no options: channel names come from ``data.channels``."""


Totals = dict[str, tuple[float, float]]  # channel name -> (loss sum, loss tokens)


def channel_sums(
    token_losses: torch.Tensor,
    loss_mask: torch.Tensor,
    dataset_ids: torch.Tensor,
    num_channels: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add (sum of masked token losses, loss tokens) per channel to ``out``, ``[channels, 2]`` float64."""
    if out is None:
        out = torch.zeros(num_channels, 2, dtype=torch.float64, device=token_losses.device)
    ids = dataset_ids if dataset_ids.device == out.device else dataset_ids.to(out.device, non_blocking=True)
    # One [b, 2] (loss sum, tokens) per sample, one index_add: few ops, whatever b is.
    sums = (token_losses * loss_mask).sum(dim=1, dtype=torch.float64)
    per_sample = torch.stack((sums, loss_mask.sum(dim=1, dtype=torch.float64)), dim=1)
    return out.index_add_(0, ids, per_sample)


def _add(totals: Totals, name: str, loss_sum: float, tokens: float) -> None:
    old_sum, old_tokens = totals.get(name, (0.0, 0.0))
    totals[name] = (old_sum + loss_sum, old_tokens + tokens)


def named_totals(sums: torch.Tensor, names: tuple, into: Totals | None = None) -> Totals:
    """Add the rows of ``sums`` to ``into`` by channel name (one host transfer)."""
    into = dict(into or {})
    for name, (loss_sum, tokens) in zip(names, sums.tolist(), strict=True):
        if tokens > 0:
            _add(into, name, loss_sum, tokens)
    return into


def reduce_channels(parts: list[Totals]) -> dict[str, tuple[float, int]]:
    """Per-rank totals -> ``{channel: (token-weighted mean loss, tokens)}`` for channels with tokens."""
    total: Totals = {}
    for part in parts:
        for name, (loss_sum, tokens) in part.items():
            _add(total, name, loss_sum, tokens)
    return {name: (s / t, int(round(t))) for name, (s, t) in total.items() if t > 0}


# Micro-batches held before their losses are summed: bounds the memory a long log window holds
# (at seq 4096 and micro-batch 1, 32 KiB each: 32 MiB) while summing rarely. Each sum is a few
# tensor ops; per iteration they cost ~150 us of a ~20 ms tiny CPU iteration (bench/patches_overhead.py).
MAX_HELD_MICRO_BATCHES = 1024


class _Accumulator:
    """Per-channel sums of one phase on the device, plus what earlier phases left by name.

    A micro-batch's detached losses wait in ``pending`` (references, no work) until its
    iteration is known to count (``keep_pending``), then in ``kept`` until ``add_kept`` sums
    them all at once: a few tensor ops per log window (or per ``MAX_HELD_MICRO_BATCHES``),
    not per micro-batch or per iteration.
    """

    def __init__(self) -> None:
        self.names: tuple = ()
        self.sums: torch.Tensor | None = None
        self.carried: Totals = {}
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def start_phase(self, names: tuple, device) -> None:
        if self.sums is not None:
            self.add_kept()  # with the old phase's channels
            self.carried = named_totals(self.sums, self.names, self.carried)
        self.names = tuple(names)
        self.sums = torch.zeros(len(self.names), 2, dtype=torch.float64, device=device)

    def keep_pending(self) -> None:
        self.kept += self.pending
        self.pending.clear()
        if len(self.kept) >= MAX_HELD_MICRO_BATCHES:
            self.add_kept()

    def add_kept(self) -> None:
        if self.kept:
            losses, masks, dataset_ids = (torch.cat(parts) for parts in zip(*self.kept, strict=True))
            channel_sums(losses, masks, dataset_ids, len(self.names), out=self.sums)
            self.kept.clear()

    def take(self) -> Totals:
        """Everything kept so far, by name; starts over."""
        self.add_kept()
        totals = named_totals(self.sums, self.names, self.carried)
        self.sums.zero_()
        self.carried = {}
        return totals


class ChannelLoss(Hook):
    name = "channel_loss"

    def __init__(self) -> None:
        self.window = _Accumulator()  # iterations since the last log
        self.valid = _Accumulator()  # the current evaluation

    def on_phase_start(self, ctx: HookContext, phase: PhaseInfo) -> None:
        device = next(ctx.objects.gpt.parameters()).device
        self.window.start_phase(phase.channels, device)
        self.valid.start_phase(phase.channels, device)

    def on_micro_batch_loss(
        self,
        ctx: HookContext,
        token_losses: torch.Tensor,
        loss_mask: torch.Tensor,
        batch: dict[str, torch.Tensor],
        training: bool,
    ) -> None:
        target = self.window if training else self.valid
        target.pending.append((token_losses, loss_mask, batch["dataset_id"]))

    def after_step(self, ctx: HookContext, report: StepReport, requests: Requests) -> None:
        if math.isfinite(report.loss):
            self.window.keep_pending()
        else:  # as the loop's Window: a non-finite iteration counts nowhere
            self.window.pending.clear()

    def on_log(self, ctx: HookContext, metrics: dict[str, float]) -> None:
        reduced = self._exchange(self.window)
        for name, (loss, tokens) in reduced.items():
            metrics[f"channel_loss/{name}"] = loss
            metrics[f"channel_tokens/{name}"] = float(tokens)
        if reduced:
            parts = [f"{name} {loss:.4f} ({tokens:,} tok)" for name, (loss, tokens) in reduced.items()]
            ctx.writer.console("channel loss | " + " | ".join(parts))

    def on_eval(self, ctx: HookContext, metrics: dict[str, float]) -> None:
        self.valid.keep_pending()
        for name, (loss, _) in self._exchange(self.valid).items():
            metrics[f"channel_val_loss/{name}"] = loss

    @staticmethod
    def _exchange(accumulator: _Accumulator) -> dict[str, tuple[float, int]]:
        gathered = gather_on_last_stage(accumulator.take())
        return reduce_channels(gathered) if gathered is not None else {}


def enable(options: Options, config: TrainConfig) -> ChannelLoss:
    return ChannelLoss()
