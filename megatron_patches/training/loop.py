"""The training loop: iterate, evaluate, log, checkpoint; patches plug in through ``hooks``.

What it logs and how: ``progress.py``; ``train.manual_gc``: ``manual_gc.py``.

Every decision that changes what ranks do next (skip an update, save, stop)
is taken on values all ranks share (the all-reduced loss, the grad norm, a
broadcast flag), so no rank can enter a collective the others skip.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_patches.exit_signals import ExitSignals
from megatron_patches.hooks import Hook, Requests, StepReport, phase_model_config
from megatron_patches.training import checkpoint, finished, manual_gc, rollback, skip_windows
from megatron_patches.training.agreement import LOOP_FLAGS, RankAgreement
from megatron_patches.training.builder import TrainingObjects, gather_params
from megatron_patches.training.config import Config
from megatron_patches.training.data import Phase, PhaseData, phase_at
from megatron_patches.training.metrics import MetricsWriter
from megatron_patches.training.progress import ProgressLog
from megatron_patches.training.step import forward_backward, global_loss, optimizer_step


@dataclass
class TrainContext:
    """What hooks may read (and the few things they may change) during a run."""

    cfg: Config
    run_dir: Path
    objects: TrainingObjects
    data: PhaseData
    writer: MetricsWriter
    state: checkpoint.TrainState
    phase: Phase | None = None


class Trainer:
    def __init__(self, ctx: TrainContext, hooks: list[Hook], save_dir: Path) -> None:
        self.ctx = ctx
        self.hooks = hooks
        self.save_dir = save_dir
        self.last_save_time = time.monotonic()
        self.last_saved_iteration = ctx.state.iteration
        self.device = next(ctx.objects.gpt.parameters()).device
        self.agreement = RankAgreement(hooks, self.device)  # rank 0's flags and exit signals, shared
        self.exit_signals = ExitSignals()  # SIGTERM/SIGUSR1: checkpoint and stop, as `touch stop`
        self.startup = None  # run.py's StartupTimer: logs the time to the first loss, once
        self.progress = ProgressLog(ctx, self.device)  # metrics.jsonl, TensorBoard, console lines

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> int:
        with manual_gc.automatic_gc_off(self.ctx.cfg.train.manual_gc), self.exit_signals:
            return self._run()

    def _run(self) -> int:
        cfg, ctx = self.ctx.cfg, self.ctx
        for hook in self.hooks:
            hook.on_train_start(ctx)
        while ctx.state.iteration < cfg.train.train_iters:
            entered = time.perf_counter()
            self._enter_phase_if_needed()
            report, seconds = self._train_iteration()
            if self.startup is not None:  # entering the first phase builds the dataset indices
                ctx.writer.console(self.startup.first_loss(time.perf_counter() - entered - seconds, seconds))
                self.startup = None
            requests = self._requests_after(report)
            self._after_iteration(report, seconds)
            interval = cfg.train.manual_gc_interval
            if interval and ctx.state.iteration % interval == 0:
                self._manual_collect()
            if requests.rollback and self._roll_back(requests) and not requests.stop:
                continue
            reason = self._checkpoint_reason(report, requests)
            if reason:
                self.save(reason)
            if requests.stop:
                ctx.writer.console(f"stopping after iteration {ctx.state.iteration}: {requests.stop}")
                if reason and ctx.state.iteration >= cfg.train.train_iters:  # the last one, saved
                    self._mark_finished()
                return 0
        if cfg.checkpoint.save_at_end and self.last_saved_iteration != ctx.state.iteration:
            self.save("end of training")
        self._mark_finished()
        return 0

    def _requests_after(self, report: StepReport) -> Requests:
        """What this iteration asks of the loop: exit_interval, a signal's stop, the hooks' requests."""
        ctx, exit_interval = self.ctx, self.ctx.cfg.train.exit_interval
        requests = Requests()
        if exit_interval and ctx.state.iteration % exit_interval == 0:
            requests.stop = f"exit_interval {exit_interval}"
        if report.exit_signals:  # any rank's signal, counted by the agreement: all stop here
            world = torch.distributed.get_world_size()
            requests.stop = requests.stop or self.exit_signals.reason(report.exit_signals, world)
        for hook in self.hooks:
            hook.after_step(ctx, report, requests)
        return requests

    def _mark_finished(self) -> None:
        """All of train_iters trained: ``run_dir/finished.json`` (``finished.py``), from rank 0."""
        ctx = self.ctx
        if torch.distributed.get_rank() == 0:
            saved = self.last_saved_iteration == ctx.state.iteration
            finished.mark(ctx.run_dir, ctx.state.iteration, ctx.cfg.train.train_iters, saved)

    def _roll_back(self, requests: Requests) -> bool:
        """A hook's roll-back: reload the newest checkpoint (and skip data); without one, stop unsaved.

        A stop asked in the same iteration stops without saving too: the newest checkpoint is
        the state rolled back to, and a relaunch meets (and skips) the same bad data again.
        """
        self._manual_collect()
        record = rollback.roll_back(self.ctx, self.hooks, self.save_dir, requests.rollback)
        if record is None:
            requests.stop = f"{requests.rollback.reason}; no checkpoint to roll back to"
        else:
            self.last_saved_iteration = self.ctx.state.iteration
        requests.stop_without_save = requests.stop_without_save or bool(requests.stop)
        return record is not None

    def _manual_collect(self) -> None:
        manual_gc.collect(self.ctx.cfg.train.manual_gc)  # every rank at the same point

    def _enter_phase_if_needed(self) -> None:
        phase = phase_at(self.ctx.data.phases, self.ctx.state.iteration)
        if phase is self.ctx.phase:
            return
        self.ctx.data.enter(phase)
        self.ctx.phase = phase
        self.ctx.writer.console(
            f"phase {phase.name!r}: iterations {phase.start_iteration}..{phase.end_iteration - 1}, "
            f"seq_length {phase.seq_length}, global batch {phase.global_batch_size} sequences"
        )
        for hook in self.hooks:
            hook.on_phase_start(self.ctx, phase)

    def _train_iteration(self) -> tuple[StepReport, float]:
        ctx, objs = self.ctx, self.ctx.objects
        start = time.perf_counter()
        batches = ctx.data.train_batches(ctx.state.iteration)
        objs.model.zero_grad_buffer()
        objs.optimizer.zero_grad()
        loss_sum, tokens = self._forward_backward(batches)
        self.progress.moe_losses.add(ctx.data.num_microbatches())
        loss, total_tokens = global_loss(loss_sum, tokens, self.device)
        agreed = self.agreement.exchange(self._rank0_answers, self.exit_signals.received is not None)
        lr = objs.optimizer.param_groups[0]["lr"]  # the step's LR: the scheduler moves it after the step
        updated, grad_norm = self._update(loss)
        report = StepReport(
            iteration=ctx.state.iteration,
            loss=loss,
            tokens=total_tokens,
            grad_norm=grad_norm,
            lr=lr,
            skipped=not updated,
            sample_ids=[int(i) for b in batches for i in b["sample_id"]],
            dataset_ids=[int(i) for b in batches for i in b["dataset_id"]],
            flags=agreed.flags,
            exit_signals=agreed.exit_signals,
        )
        return report, time.perf_counter() - start

    def _forward_backward(self, batches: list[dict], forward_only: bool = False) -> tuple[float, float]:
        """One iteration's micro-batches through Megatron-Core's schedule (``step.forward_backward``)."""
        ctx = self.ctx
        phase = ctx.phase
        return forward_backward(
            ctx.objects.model,
            batches,
            ctx.data.num_microbatches(),
            phase.seq_length,
            phase.micro_batch_size,
            self.hooks,
            ctx,
            forward_only=forward_only,
        )

    def _update(self, loss: float) -> tuple[bool, float | None]:
        """Optimizer step unless a hook vetoes it, then the LR scheduler and the counters advance."""
        ctx, objs = self.ctx, self.ctx.objects

        def veto(grad_norm: float) -> bool:
            return any([hook.skip_update(ctx, loss, grad_norm) for hook in self.hooks])  # all hooks run

        updated, grad_norm = optimizer_step(objs.optimizer, loss, veto)
        objs.scheduler.step(increment=1)
        ctx.state.iteration += 1
        ctx.state.consumed_samples += ctx.phase.global_batch_size
        return updated, grad_norm

    def _rank0_answers(self) -> set[str]:
        """On global rank 0: the loop's and the hooks' yes/no answers that hold, by flag name."""
        minutes = self.ctx.cfg.checkpoint.save_interval_minutes
        wall_clock_save = bool(minutes) and time.monotonic() - self.last_save_time >= 60 * minutes
        answers = {LOOP_FLAGS[0]} if wall_clock_save else set()
        for hook in self.hooks:
            answers.update(f"{hook.name}.{flag}" for flag in hook.rank0_flags(self.ctx))
        return answers

    # -- logging ---------------------------------------------------------------------------
    def _after_iteration(self, report: StepReport, seconds: float) -> None:
        cfg = self.ctx.cfg
        self.progress.record(report, seconds)
        last = report.iteration == cfg.train.train_iters
        if report.iteration % cfg.logging.log_interval == 0 or last:
            self.progress.log_window(self.hooks)
        interval = cfg.logging.eval_interval
        if interval and (report.iteration % interval == 0 or last):
            self.evaluate()

    def evaluate(self) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.cfg
        self._manual_collect()
        ctx.objects.model.eval()
        loss_sum = tokens = 0.0
        with torch.no_grad():
            for k in range(cfg.logging.eval_iters):
                s, t = self._forward_backward(ctx.data.valid_batches(k), forward_only=True)
                loss_sum, tokens = loss_sum + s, tokens + t
        ctx.objects.model.train()
        loss, _ = global_loss(loss_sum, tokens, self.device)
        metrics = {"lm loss validation": loss, "lm loss validation ppl": math.exp(min(loss, 50.0))}
        for hook in self.hooks:
            hook.on_eval(ctx, metrics)
        ctx.writer.scalars(metrics, ctx.state.iteration)
        ctx.writer.console(f"validation at iteration {ctx.state.iteration} | lm loss {loss:.4f}")
        return metrics

    # -- checkpoints -----------------------------------------------------------------------
    def _checkpoint_reason(self, report: StepReport, requests: Requests) -> str | None:
        """Why a checkpoint is due after this iteration (logged with it), or None.

        A stop's reason comes from whoever asked (the stop file, exit_interval, a signal, a spike).
        """
        cfg, it = self.ctx.cfg.checkpoint, self.ctx.state.iteration
        if requests.stop_without_save:
            return None
        if requests.save or requests.stop:
            return requests.save or requests.stop
        if cfg.save_interval and it % cfg.save_interval == 0:
            return f"interval of {cfg.save_interval} iterations"
        if report.flags[LOOP_FLAGS[0]]:  # rank 0's clock decided, shared by the agreement
            return f"wall-clock interval of {cfg.save_interval_minutes:g} minutes"
        return None

    def _keep_from(self) -> int | None:
        """Pruning spares the newest checkpoint at or before this iteration (and newer ones): the one a
        roll-back with a look-back after the next iteration reloads (``rollback.target``)."""
        lookbacks = [n for hook in self.hooks if (n := hook.rollback_lookback()) is not None]
        return self.ctx.state.iteration + 1 - max(lookbacks) if lookbacks else None

    def save(self, reason: str) -> Path | None:
        ctx = self.ctx
        if self.last_saved_iteration == ctx.state.iteration:
            return None  # this iteration is already on disk (e.g. interval and trigger together)
        self._manual_collect()
        ctx.state.patch_state = {hook.name: hook.state_dict() for hook in self.hooks}
        ctx.state.skip_samples = skip_windows.to_json(ctx.data.skipped)
        start = time.perf_counter()
        objs = ctx.objects
        gather_params(objs.model)  # ddp.overlap_param_gather: the last step's weights are not gathered yet
        path = checkpoint.save(
            self.save_dir,
            objs.gpt,
            objs.optimizer,
            objs.scheduler,
            ctx.state,
            phase_model_config(self.hooks, ctx.phase, ctx.cfg.model),  # e.g. the rotary base trained with
            ctx.cfg.checkpoint.keep_last,
            ctx.cfg.checkpoint.dist_ckpt_optim_fully_reshardable,
            self._keep_from(),
        )
        self.progress.usage.write_counts(ctx.data, ctx.state.iteration, path, torch.distributed.get_rank())
        self.last_save_time = time.monotonic()
        self.last_saved_iteration = ctx.state.iteration
        ctx.writer.console(f"saved checkpoint {path} ({reason}) in {time.perf_counter() - start:.1f} s")
        for hook in self.hooks:
            hook.after_save(ctx, path)
        return path
