"""One training or evaluation iteration through Megatron-Core's pipeline schedules.

``forward_backward`` runs ``get_forward_backward_func()`` (no pipelining, 1F1B
across PP stages, or interleaved 1F1B over the model chunks of virtual stages)
over one iteration's micro-batches. The loss is per token
(``calculate_per_token_loss``): each micro-batch returns the sum of
its token losses and its token count, and ``finalize_model_grads`` divides the
gradients by the global batch's token count, so the gradient is that of the
token-weighted mean loss that is logged. The last stage hands each
micro-batch's per-token losses to the hooks (channel loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING

import torch

from megatron_patches.compat import require_signature
from megatron_patches.parallel import model_chunks

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer

    from megatron_patches.hooks import Hook
    from megatron_patches.training.loop import TrainContext

Batch = dict[str, torch.Tensor]


def _check_pinned_api() -> None:
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.pipeline_parallel import schedules

    require_signature(clip_grad_by_total_norm_fp32, ["parameters", "max_norm", "total_norm"])
    for method in ("prepare_grads", "get_grad_norm", "step_with_ready_grads"):
        require_signature(getattr(ChainedOptimizer, method), ["self"])
    require_signature(
        schedules.forward_backward_no_pipelining,
        ["forward_step_func", "data_iterator", "model", "num_microbatches", "seq_length", "micro_batch_size"],
    )


_check_pinned_api()


def loss_func(
    hooks: list[Hook], ctx: TrainContext, batch: Batch, training: bool, token_losses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron's 3-tuple loss: (sum of token losses, token count, reported [sum, count])."""
    mask = batch["loss_mask"].to(token_losses.device).float()
    losses = token_losses.float()
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    for hook in hooks:
        hook.on_micro_batch_loss(ctx, losses.detach(), mask, batch, training)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(
    hooks: list[Hook],
    ctx: TrainContext,
    training: bool,
    data_iterator: Iterator[Batch],
    model: torch.nn.Module,
) -> tuple[torch.Tensor, Callable]:
    """Megatron ``forward_step_func``: every rank reads the batch, each stage uses its part."""
    batch = next(data_iterator)
    gpt = _unwrap(model)
    device = next(gpt.parameters()).device
    tokens = batch["tokens"].to(device) if gpt.pre_process else None
    positions = batch["position_ids"].to(device) if gpt.pre_process else None
    labels = batch["labels"].to(device) if gpt.post_process else None
    # data.reset_attention_mask: every stage's attention needs the document mask
    mask = batch["attention_mask"].to(device) if "attention_mask" in batch else None
    output = model(tokens, positions, mask, labels=labels)
    return output, partial(loss_func, hooks, ctx, batch, training)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def forward_backward(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    hooks: list[Hook],
    ctx: TrainContext,
    forward_only: bool = False,
) -> tuple[float, float]:
    """Run one iteration's micro-batches; return (loss sum, token count) of this DP rank.

    Both are 0 off the last pipeline stage.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = model_chunks(model)
    # The interleaved schedule reads micro-batch k once per chunk, each chunk from its own iterator.
    iterators = [iter(batches) for _ in chunks]
    reports = get_forward_backward_func()(
        forward_step_func=partial(forward_step, hooks, ctx, not forward_only),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not reports:
        return 0.0, 0.0
    total = torch.stack([r["lm loss"] for r in reports]).sum(dim=0)
    return float(total[0]), float(total[1])


def global_loss(loss_sum: float, tokens: float, device: torch.device) -> tuple[float, int]:
    """Token-weighted mean loss of the global batch, known to every rank afterwards.

    Only last-stage ranks hold non-zero sums; summing over the whole world counts
    each DP replica's tokens once per TP rank, so divide by TP. Returns (loss, tokens).
    """
    from megatron.core import parallel_state as ps

    values = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    loss_total, token_total = values.tolist()
    tp = ps.get_tensor_model_parallel_world_size()
    total_tokens = int(round(token_total)) // tp
    loss = loss_total / tp / total_tokens if total_tokens else float("nan")
    return loss, total_tokens


def optimizer_step(
    optimizer: MegatronOptimizer, loss: float, veto: Callable[[float], bool]
) -> tuple[bool, float | None]:
    """``ChainedOptimizer.step`` with a decision point between grad norm and update.

    Megatron-Core's ``step()`` only refuses an update when fp16 loss scaling
    finds an overflow; with bf16/fp32 a NaN gradient would be applied. Here a
    non-finite loss or grad norm never updates the weights, and ``veto(grad_norm)``
    (the hooks' ``skip_update``, run on every rank) may refuse it too. Returns
    (updated, grad norm).
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():  # fp16 overflow
        return False, None
    grad_norm = float(optimizer.get_grad_norm())
    refused = veto(grad_norm)  # every rank runs every hook, whatever the loss
    if refused or not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return False, grad_norm
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = inner.get_parameters()
        if inner.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, max_norm=inner.config.clip_grad, total_norm=grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm
