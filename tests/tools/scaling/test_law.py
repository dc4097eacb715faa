"""Chinchilla approach 3 on synthetic runs drawn from a known law: recovery, intervals, the optimal split."""

import numpy as np
import pytest

from megatron_patches.errors import ConfigError
from tools.scaling.law import Law, bootstrap_laws, fit_law, interval

TRUE = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al.'s fitted law


def synthetic_runs(noise: float, seed: int = 0):
    """A 6 x 6 grid of sizes (1e7..1e9) and token counts (1e9..1e11), losses with log-normal noise."""
    n, d = np.meshgrid(np.logspace(7, 9, 6), np.logspace(9, 11, 6))
    n, d = n.ravel(), d.ravel()
    loss = TRUE.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0.0, noise, n.shape))
    return n, d, loss


def test_the_fit_recovers_the_exponents_of_a_known_law_within_5_percent():
    law = fit_law(*synthetic_runs(noise=0.002))
    assert law.alpha == pytest.approx(TRUE.alpha, rel=0.05)
    assert law.beta == pytest.approx(TRUE.beta, rel=0.05)
    # E is pinned down well; A and B trade off against the exponents, so only their scale is checked.
    for name, rel in (("E", 0.05), ("A", 0.5), ("B", 0.5)):
        assert getattr(law, name) == pytest.approx(getattr(TRUE, name), rel=rel), name


def test_one_corrupted_run_does_not_move_the_robust_fit():
    n, d, loss = synthetic_runs(noise=0.0)
    loss[7] *= 1.5  # a diverged run
    law = fit_law(n, d, loss)
    assert law.alpha == pytest.approx(TRUE.alpha, rel=0.02)
    assert law.beta == pytest.approx(TRUE.beta, rel=0.02)


def test_bootstrap_intervals_contain_the_true_exponents_and_the_true_optimal_loss():
    n, d, loss = synthetic_runs(noise=0.005, seed=1)
    law = fit_law(n, d, loss)
    laws = bootstrap_laws(n, d, loss, law, samples=40, seed=0)
    assert len(laws) >= 35
    for name in ("alpha", "beta"):
        low, high = interval([getattr(b, name) for b in laws])
        assert low <= getattr(TRUE, name) <= high, name
        assert high - low < 0.5 * getattr(TRUE, name)  # informative, not everything
    compute = 1e24
    low, high = interval([b.loss(*b.optimal_split(compute)) for b in laws])
    assert low <= TRUE.loss(*TRUE.optimal_split(compute)) <= high


def test_the_optimal_split_is_the_minimum_loss_at_its_compute():
    compute = 5.76e23  # Chinchilla's budget
    n_opt, d_opt = TRUE.optimal_split(compute)
    assert 6 * n_opt * d_opt == pytest.approx(compute)
    sizes = n_opt * np.logspace(-1, 1, 401)
    losses = TRUE.loss(sizes, compute / (6 * sizes))
    assert sizes[np.argmin(losses)] == pytest.approx(n_opt, rel=0.02)


def test_too_few_runs_and_non_positive_losses_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="at least 5 runs"):
        fit_law([1e6, 2e6, 4e6], [1e9, 1e9, 1e9], [3.0, 2.9, 2.8])
    with pytest.raises(ConfigError, match="positive and finite"):
        fit_law([1e6] * 5, [1e9] * 5, [3.0, 2.9, float("nan"), 2.8, 2.7])
