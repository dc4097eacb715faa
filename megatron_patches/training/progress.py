"""The loop's progress log: a record per iteration, and per ``logging.log_interval`` a window's metrics.

A window sums the iterations since the last log (the loss weighted by tokens, the time, the skipped
updates). Its metrics go to the hooks (``on_log``, which may add their own), TensorBoard and the
console as one line. MoE auxiliary losses (``moe_losses``) and tokens per channel (``data_usage``)
are collective: every rank logs every window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megatron_patches.training.data_usage import DataUsage
from megatron_patches.training.metrics import flops_per_iteration, format_eta, peak_flops_per_gpu
from megatron_patches.training.moe_losses import AuxLossWindow

if TYPE_CHECKING:
    from megatron_patches.hooks import Hook, StepReport
    from megatron_patches.training.data import Phase
    from megatron_patches.training.loop import TrainContext


@dataclass
class Window:
    """Sums since the last console/TensorBoard log."""

    loss_sum: float = 0.0
    tokens: int = 0
    iterations: int = 0
    skipped: int = 0
    seconds: float = 0.0
    lr: float = float("nan")  # the LR the window's last step used

    def add(self, report: StepReport, seconds: float) -> None:
        if math.isfinite(report.loss):
            self.loss_sum += report.loss * report.tokens
            self.tokens += report.tokens
        self.iterations += 1
        self.skipped += report.skipped
        self.seconds += seconds
        self.lr = report.lr


class ProgressLog:
    """``metrics.jsonl`` per iteration; per window the metrics, the hooks' ``on_log`` and one console line."""

    def __init__(self, ctx: TrainContext, device: torch.device) -> None:
        self.ctx = ctx
        self.window = Window()
        self.last_grad_norm: float | None = None
        self.moe_losses = AuxLossWindow(ctx.cfg.model, device)  # moe/aux_loss, moe/z_loss
        self.usage = DataUsage()  # channel_tokens_total/<name>; <checkpoint>/usage document counts

    def record(self, report: StepReport, seconds: float) -> None:
        """Add one iteration to the window and write its ``metrics.jsonl`` record."""
        self.window.add(report, seconds)
        if report.grad_norm is not None:
            self.last_grad_norm = float(report.grad_norm)
        self.ctx.writer.record(
            {
                "iteration": report.iteration,
                "loss": report.loss,
                "tokens": report.tokens,
                "lr": report.lr,
                "grad_norm": report.grad_norm,
                "skipped": report.skipped,
                "seconds": round(seconds, 4),
            }
        )

    def log_window(self, hooks: list[Hook]) -> None:
        """The window's metrics to the hooks, TensorBoard and the console; a new window starts."""
        ctx = self.ctx
        per_iter = self.window.seconds / max(self.window.iterations, 1)
        metrics = self._metrics(per_iter)
        for hook in hooks:
            hook.on_log(ctx, metrics)
        ctx.writer.scalars(metrics, ctx.state.iteration)
        ctx.writer.console(self._console_line(metrics, per_iter))
        self.window = Window()

    def _metrics(self, per_iter: float) -> dict[str, float]:
        ctx, win = self.ctx, self.window
        world = torch.distributed.get_world_size()
        tokens_per_iter = ctx.phase.tokens_per_iteration
        metrics = {
            "lm loss": win.loss_sum / win.tokens if win.tokens else float("nan"),
            "lr": win.lr,  # the LR the last step used, as metrics.jsonl has it (not the next step's)
            "tokens-per-sec": tokens_per_iter / per_iter,
            "tokens-per-sec-per-gpu": tokens_per_iter / per_iter / world,
            "iteration-time": per_iter,
            "consumed-tokens": float(consumed_tokens(ctx.data.phases, ctx.state.iteration)),
        }
        if self.last_grad_norm is not None:
            metrics["grad-norm"] = self.last_grad_norm
        metrics.update(self.moe_losses.read())  # collective: every rank logs a window
        metrics.update(self.usage.channel_metrics(ctx.data, ctx.state.iteration))  # every rank
        peak = peak_flops_per_gpu()
        if peak:
            flops = flops_per_iteration(ctx.cfg.model, ctx.phase.seq_length, ctx.phase.global_batch_size)
            metrics["mfu"] = flops / per_iter / world / peak
        if torch.cuda.is_available():  # against the memory plan (bench/gpu_check.sh)
            metrics["peak-memory-gib"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics

    def _console_line(self, metrics: dict[str, float], per_iter: float) -> str:
        ctx, train_iters = self.ctx, self.ctx.cfg.train.train_iters
        it, skipped = ctx.state.iteration, self.window.skipped
        eta = format_eta((train_iters - it) * per_iter)
        return (
            f"iteration {it:>7d}/{train_iters} | "
            f"consumed tokens {consumed_tokens(ctx.data.phases, it):,} | "
            f"lm loss {metrics['lm loss']:.4f} | lr {metrics['lr']:.3e} | "
            f"grad norm {metrics.get('grad-norm', float('nan')):.3f} | "
            f"tokens/s {metrics['tokens-per-sec']:,.0f} ({metrics['tokens-per-sec-per-gpu']:,.0f}/rank)"
            + (f" | MFU {metrics['mfu']:.1%}" if "mfu" in metrics else "")
            + (f" | peak memory {metrics['peak-memory-gib']:.2f} GiB" if "peak-memory-gib" in metrics else "")
            + (f" | skipped {skipped}" if skipped else "")
            + f" | ETA {eta}"
        )


def consumed_tokens(phases: list[Phase], iteration: int) -> int:
    """Tokens the run has trained on after ``iteration`` iterations, over its phases."""
    return sum(
        min(max(iteration - p.start_iteration, 0), p.iterations) * p.tokens_per_iteration for p in phases
    )
