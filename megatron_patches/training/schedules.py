"""Learning-rate schedules: Megatron-Core's ``OptimizerParamScheduler`` plus DeepSeek's multi-step.

Steps are iterations. Because the sequence-length schedule keeps tokens per
iteration constant, a fraction of iterations is the same fraction of training
tokens. ``constant``, ``linear``, ``cosine`` and ``WSD`` are Megatron-Core's own
formulas (``OptimizerParamScheduler.get_lr``); ``multi-step`` (DeepSeek LLM,
2024) holds the peak LR after warmup, then drops to ``factors[i] * max_lr`` from
``boundaries[i] * decay_iters`` on. :func:`lr_at` is the same policy as a pure
function, for tests and plots.
"""

from __future__ import annotations

import bisect
import math

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_patches.compat import require_signature
from megatron_patches.errors import ConfigError
from megatron_patches.training.config import OptimConfig

DECAY_STYLES = ("constant", "linear", "cosine", "WSD", "multi-step")
WSD_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")

require_signature(
    OptimizerParamScheduler.__init__,
    [
        "self",
        "optimizer",
        "init_lr",
        "max_lr",
        "min_lr",
        "lr_warmup_steps",
        "lr_decay_steps",
        "lr_decay_style",
    ],
)
require_signature(OptimizerParamScheduler.get_lr, ["self", "param_group"])


def validate_schedule(opt: OptimConfig, train_iters: int) -> None:
    decay_iters = opt.lr_decay_iters or train_iters
    if opt.lr_decay_style not in DECAY_STYLES:
        raise ConfigError(
            f"optimizer.lr_decay_style must be one of {DECAY_STYLES}, got {opt.lr_decay_style!r}"
        )
    if not 0 <= opt.min_lr <= opt.lr:
        raise ConfigError(f"need 0 <= min_lr ({opt.min_lr}) <= lr ({opt.lr})")
    if not 0 <= opt.lr_warmup_init <= opt.lr:
        raise ConfigError(f"need 0 <= lr_warmup_init ({opt.lr_warmup_init}) <= lr ({opt.lr})")
    if not 0 <= opt.lr_warmup_iters < decay_iters:
        raise ConfigError(
            f"lr_warmup_iters ({opt.lr_warmup_iters}) must be below lr_decay_iters ({decay_iters})"
        )
    if opt.lr_decay_style == "WSD":
        if opt.lr_wsd_decay_style not in WSD_STYLES:
            raise ConfigError(
                f"lr_wsd_decay_style must be one of {WSD_STYLES}, got {opt.lr_wsd_decay_style!r}"
            )
        if not opt.lr_wsd_decay_iters or not 0 < opt.lr_wsd_decay_iters <= decay_iters - opt.lr_warmup_iters:
            raise ConfigError(
                f"WSD needs 0 < lr_wsd_decay_iters ({opt.lr_wsd_decay_iters}) <= "
                f"lr_decay_iters - lr_warmup_iters ({decay_iters - opt.lr_warmup_iters})"
            )
    if opt.lr_decay_style == "multi-step":
        _validate_multi_step(opt.lr_multi_step_boundaries, opt.lr_multi_step_factors)


def _validate_multi_step(boundaries: list, factors: list) -> None:
    if len(boundaries) != len(factors) or not boundaries:
        raise ConfigError(
            f"lr_multi_step_boundaries {boundaries} and lr_multi_step_factors {factors} "
            "must be non-empty lists of the same length"
        )
    if any(not 0 < b < 1 for b in boundaries) or boundaries != sorted(boundaries):
        raise ConfigError(f"lr_multi_step_boundaries {boundaries} must be increasing fractions in (0, 1)")
    if any(not 0 < f <= 1 for f in factors):
        raise ConfigError(f"lr_multi_step_factors {factors} must be in (0, 1]")


def multi_step_coeff(step: int, decay_iters: int, boundaries: list, factors: list) -> float:
    """The fraction of max LR at ``step``: 1 before the first boundary, then ``factors[i]``."""
    passed = bisect.bisect_right([b * decay_iters for b in boundaries], step)
    return 1.0 if passed == 0 else float(factors[passed - 1])


def lr_at(step: int, opt: OptimConfig, train_iters: int) -> float:
    """The learning rate after ``step`` iterations: the reference formula of every style."""
    decay_iters = opt.lr_decay_iters or train_iters
    warmup = opt.lr_warmup_iters
    if warmup > 0 and step <= warmup:
        return opt.lr_warmup_init + (opt.lr - opt.lr_warmup_init) * step / warmup
    if opt.lr_decay_style == "constant":
        return opt.lr
    if opt.lr_decay_style == "multi-step":
        return opt.lr * multi_step_coeff(
            step, decay_iters, opt.lr_multi_step_boundaries, opt.lr_multi_step_factors
        )
    if step > decay_iters:
        return opt.min_lr
    ratio = (step - warmup) / (decay_iters - warmup)
    if opt.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    elif opt.lr_decay_style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:  # WSD: stable at the peak, then decay over the last lr_wsd_decay_iters
        coeff = _wsd_coeff(step, decay_iters, opt.lr_wsd_decay_iters, opt.lr_wsd_decay_style)
    return opt.min_lr + coeff * (opt.lr - opt.min_lr)


def _wsd_coeff(step: int, decay_iters: int, wsd_iters: int, style: str) -> float:
    start = decay_iters - wsd_iters
    if step <= start:
        return 1.0
    ratio = (step - start) / wsd_iters
    return {
        "linear": lambda r: 1.0 - r,
        "cosine": lambda r: 0.5 * (math.cos(math.pi * r) + 1.0),
        "exponential": lambda r: 2.0 * 0.5**r - 1.0,
        "minus_sqrt": lambda r: 1.0 - math.sqrt(r),
    }[style](ratio)


class PretrainScheduler(OptimizerParamScheduler):
    """``OptimizerParamScheduler`` that also knows the ``multi-step`` style."""

    def __init__(self, optimizer, opt: OptimConfig, train_iters: int) -> None:
        self.multi_step = (opt.lr_multi_step_boundaries, opt.lr_multi_step_factors)
        super().__init__(
            optimizer,
            init_lr=opt.lr_warmup_init,
            max_lr=opt.lr,
            min_lr=opt.min_lr,
            lr_warmup_steps=opt.lr_warmup_iters,
            lr_decay_steps=opt.lr_decay_iters or train_iters,
            lr_decay_style=opt.lr_decay_style,
            start_wd=opt.weight_decay,
            end_wd=opt.weight_decay,
            wd_incr_steps=train_iters,
            wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=True,
            wsd_decay_steps=opt.lr_wsd_decay_iters,
            lr_wsd_decay_style=opt.lr_wsd_decay_style,
        )

    def get_lr(self, param_group: dict) -> float:
        in_warmup = self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps
        if self.lr_decay_style != "multi-step" or in_warmup:
            return super().get_lr(param_group)
        max_lr = param_group.get("max_lr", self.max_lr)
        return max_lr * multi_step_coeff(self.num_steps, self.lr_decay_steps, *self.multi_step)
