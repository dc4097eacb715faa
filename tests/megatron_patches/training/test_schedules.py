"""Each LR schedule equals its formula, on Megatron-Core's own scheduler."""

import math

import pytest
import torch

from megatron_patches.errors import ConfigError
from megatron_patches.training.config import OptimConfig
from megatron_patches.training.schedules import PretrainScheduler, lr_at, validate_schedule

TRAIN = 1000
PEAK, FLOOR = 3e-4, 3e-5


class _Optimizer:
    """What OptimizerParamScheduler touches: param_groups."""

    def __init__(self):
        self.param_groups = [{"params": [torch.zeros(1)]}]


def _scheduler_lrs(opt: OptimConfig, steps):
    sched = PretrainScheduler(_Optimizer(), opt, TRAIN)
    out, done = {}, 0
    for step in sorted(steps):
        sched.step(step - done)
        done = step
        out[step] = sched.optimizer.param_groups[0]["lr"]
    return out


def _formula(style, step):
    """The textbook formulas, written independently of the code under test."""
    warmup = 100
    if step <= warmup:
        return PEAK * step / warmup
    ratio = (step - warmup) / (TRAIN - warmup)
    if style == "constant":
        return PEAK
    if style == "linear":
        return FLOOR + (PEAK - FLOOR) * (1 - ratio)
    if style == "cosine":
        return FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi * ratio))
    if style == "WSD":  # stable, then linear decay over the last 200 iterations
        return PEAK if step <= 800 else FLOOR + (PEAK - FLOOR) * (1 - (step - 800) / 200)
    if style == "multi-step":  # DeepSeek: 31.6% of peak from 80% of training, 10% from 90%
        return PEAK if step < 800 else (0.316 * PEAK if step < 900 else 0.1 * PEAK)
    raise AssertionError(style)


STEPS = [0, 1, 50, 100, 101, 350, 550, 799, 800, 801, 899, 900, 901, 999, 1000]


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "WSD", "multi-step"])
def test_schedule_matches_formula_on_megatron_scheduler(style):
    opt = OptimConfig(
        lr=PEAK, min_lr=FLOOR, lr_warmup_iters=100, lr_decay_style=style, lr_wsd_decay_iters=200
    )
    validate_schedule(opt, TRAIN)
    got = _scheduler_lrs(opt, STEPS)
    for step in STEPS:
        assert got[step] == pytest.approx(_formula(style, step), rel=1e-9, abs=1e-15), step
        assert lr_at(step, opt, TRAIN) == pytest.approx(got[step], rel=1e-12, abs=1e-15), step


def test_multi_step_boundaries_and_factors_are_configurable():
    opt = OptimConfig(
        lr=1.0,
        min_lr=0.0,
        lr_decay_style="multi-step",
        lr_multi_step_boundaries=[0.5, 0.75],
        lr_multi_step_factors=[0.5, 0.25],
    )
    got = _scheduler_lrs(opt, [0, 499, 500, 749, 750, 1000])
    assert got == {0: 1.0, 499: 1.0, 500: 0.5, 749: 0.5, 750: 0.25, 1000: 0.25}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr_decay_style": "exp"}, "lr_decay_style must be one of"),
        ({"min_lr": 1.0}, "min_lr (1.0) <= lr"),
        ({"lr_warmup_iters": 1000}, "lr_warmup_iters (1000) must be below lr_decay_iters (1000)"),
        ({"lr_decay_style": "WSD"}, "WSD needs 0 < lr_wsd_decay_iters (None)"),
        (
            {"lr_decay_style": "multi-step", "lr_multi_step_factors": [0.3]},
            "must be non-empty lists of the same length",
        ),
        ({"lr_decay_style": "multi-step", "lr_multi_step_boundaries": [0.9, 0.8]}, "increasing fractions"),
    ],
)
def test_bad_schedules_are_rejected(changes, message):
    with pytest.raises(ConfigError) as err:
        validate_schedule(OptimConfig(**changes), TRAIN)
    assert message in str(err.value)
