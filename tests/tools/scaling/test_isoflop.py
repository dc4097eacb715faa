"""Approach 2 (IsoFLOP minima) and the optimal learning-rate / batch laws on synthetic grids."""

import numpy as np
import pytest

from tools.scaling.isoflop import fit_isoflop, fit_optimal_hparam
from tools.scaling.law import Law

TRUE = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def test_isoflop_minima_follow_the_laws_compute_optimal_exponent():
    compute, n = [], []
    for budget in (1e19, 1e20, 1e21, 1e22):
        centre = TRUE.optimal_split(budget)[0]
        for size in centre * np.logspace(-0.6, 0.6, 7):
            compute.append(budget * 1.05 ** len(n) % 1.1 + budget)  # whole-iteration rounding: not exact
            n.append(size)
    compute, n = np.array(compute), np.array(n)
    loss = TRUE.loss(n, compute / (6 * n))
    fit = fit_isoflop(compute, n, loss)
    assert len(fit.budgets) == 4
    assert fit.n_opt.exponent == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), rel=0.05)
    assert fit.d_opt.exponent == pytest.approx(TRUE.alpha / (TRUE.alpha + TRUE.beta), rel=0.05)
    assert fit.n_opt(1e21) == pytest.approx(TRUE.optimal_split(1e21)[0], rel=0.1)


def test_isoflop_needs_two_budgets_with_an_interior_minimum():
    n = np.array([1e7, 2e7, 4e7, 1e7, 2e7, 4e7])
    compute = np.array([1e18] * 3 + [1e19] * 3)
    falling = np.array([3.0, 2.9, 2.8, 2.7, 2.6, 2.5])  # every minimum at the largest size: no vertex inside
    assert fit_isoflop(compute, n, falling) is None
    assert fit_isoflop(compute[:3], n[:3], np.array([3.0, 2.9, 3.0])) is None  # one budget only


def test_optimal_learning_rate_law_is_recovered_from_a_grid_that_varies_it():
    coefficient, exponent = 0.3118, -0.125  # DeepSeek-LLM's eta_opt = 0.3118 C^-0.125
    compute, lrs, loss = [], [], []
    for budget in (1e17, 1e18, 1e19, 1e20):
        best = coefficient * budget**exponent
        for lr in best * np.array([0.25, 0.5, 1.0, 2.0, 4.0]):
            compute.append(budget)
            lrs.append(lr)
            loss.append(2.0 + 0.05 * np.log(lr / best) ** 2)
    law = fit_optimal_hparam(compute, lrs, loss)
    assert law.exponent == pytest.approx(exponent, rel=0.05)
    assert law.coefficient == pytest.approx(coefficient, rel=0.05)


def test_no_hparam_law_when_the_grid_does_not_vary_it():
    compute = [1e17, 1e17, 1e18, 1e18]
    assert fit_optimal_hparam(compute, [3e-3] * 4, [2.5, 2.4, 2.3, 2.2]) is None
