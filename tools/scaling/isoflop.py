"""Chinchilla approach 2 (IsoFLOP minima) and DeepSeek-LLM-style hyper-parameter laws versus compute.

Runs are grouped by compute budget (runs within ``BUDGET_TOLERANCE`` of a
group's smallest budget share it: an IsoFLOP grid rounds each run to whole
iterations). Approach 2: within each budget with at least 3 sizes, a parabola
of loss against ``log N`` gives that budget's optimal size (kept only if the
minimum lies inside the sizes tried); ``N_opt = k C^a`` is then fitted over
the budgets, and ``D_opt = C / (6 N_opt)``. Hyper-parameter laws (DeepSeek-LLM
§3.1): per budget, the learning rate (or batch size) of the lowest loss, then
``value_opt = k C^e`` over the budgets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

BUDGET_TOLERANCE = 1.2  # runs within this factor of a group's smallest budget belong to it
MIN_SIZES_PER_BUDGET = 3  # a parabola through fewer points says nothing about its minimum


@dataclass(frozen=True)
class PowerLaw:
    """``y = coefficient * x ** exponent``, least squares in log-log space."""

    coefficient: float
    exponent: float

    def __call__(self, x: float) -> float:
        return self.coefficient * x**self.exponent

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_power_law(x, y) -> PowerLaw:
    """Least-squares line through ``(log x, log y)``; needs two distinct ``x``."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(coefficient=math.exp(intercept), exponent=float(slope))


def budget_groups(compute) -> list[list[int]]:
    """Indices of the runs grouped by compute budget, budgets ascending."""
    order = np.argsort(compute)
    groups: list[list[int]] = []
    for i in order:
        if groups and compute[i] <= compute[groups[-1][0]] * BUDGET_TOLERANCE:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return groups


def isoflop_minimum(n, loss) -> float | None:
    """The size at the vertex of the parabola ``loss(log N)``, or None if it is no interior minimum."""
    log_n = np.log(np.asarray(n, dtype=np.float64))
    if len(np.unique(log_n)) < MIN_SIZES_PER_BUDGET:
        return None
    curvature, slope, _ = np.polyfit(log_n, np.asarray(loss, dtype=np.float64), 2)
    if curvature <= 0:
        return None
    vertex = -slope / (2 * curvature)
    return float(math.exp(vertex)) if log_n.min() < vertex < log_n.max() else None


@dataclass
class IsoFlopFit:
    budgets: list[dict[str, float]]  # per usable budget: compute, n_opt, d_opt
    n_opt: PowerLaw  # N_opt = k C^a
    d_opt: PowerLaw  # D_opt = k C^b

    def to_dict(self) -> dict:
        return {"budgets": self.budgets, "n_opt": self.n_opt.to_dict(), "d_opt": self.d_opt.to_dict()}


def fit_isoflop(compute, n, loss) -> IsoFlopFit | None:
    """Approach 2, or None when fewer than two budgets have an interior minimum."""
    compute, n, loss = (np.asarray(x, dtype=np.float64) for x in (compute, n, loss))
    budgets = []
    for group in budget_groups(compute):
        best = isoflop_minimum(n[group], loss[group])
        if best is not None:
            budget = float(np.exp(np.mean(np.log(compute[group]))))
            budgets.append({"compute": budget, "n_opt": best, "d_opt": budget / (6.0 * best)})
    if len(budgets) < 2:
        return None
    c = [b["compute"] for b in budgets]
    return IsoFlopFit(
        budgets=budgets,
        n_opt=fit_power_law(c, [b["n_opt"] for b in budgets]),
        d_opt=fit_power_law(c, [b["d_opt"] for b in budgets]),
    )


def fit_optimal_hparam(compute, values, loss) -> PowerLaw | None:
    """``value_opt(C)``: per budget the value of the lowest loss, where the budget tried several values.

    None when fewer than two budgets varied the value, or all their optima share one budget.
    """
    compute, values, loss = (np.asarray(x, dtype=np.float64) for x in (compute, values, loss))
    best_c, best_v = [], []
    for group in budget_groups(compute):
        if len(np.unique(values[group])) < 2:
            continue
        winner = group[int(np.argmin(loss[group]))]
        best_c.append(float(np.exp(np.mean(np.log(compute[group])))))
        best_v.append(float(values[winner]))
    if len(best_c) < 2:
        return None
    return fit_power_law(best_c, best_v)
