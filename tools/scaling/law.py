"""Chinchilla approach 3: ``L(N, D) = E + A / N^alpha + B / D^beta``, and what it predicts.

The fit follows Hoffmann et al. (2022, appendix D.2): minimise the Huber loss
(delta 1e-3) between ``log L`` and ``LSE(a - alpha log N, b - beta log D, e)``
(``A = e^a``, ``B = e^b``, ``E = e^e``) with L-BFGS, from the best of a grid of
initialisations (the whole grid is scored in one vectorised pass; the best
few are optimised), so one bad start cannot decide the answer. Confidence
intervals come from refitting on bootstrap resamples of the runs.
With ``C = 6 N D``, the compute-optimal split is
``N_opt = G (C/6)^(beta/(alpha+beta))``, ``G = (alpha A / (beta B))^(1/(alpha+beta))``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from megatron_patches.errors import ConfigError

HUBER_DELTA = 1e-3
INIT_GRID = {  # Hoffmann et al.'s grid of starting points (a, b, e, alpha, beta)
    "a": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
    "b": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
    "e": [-1.0, -0.5, 0.0, 0.5, 1.0],
    "alpha": [0.0, 0.5, 1.0, 1.5, 2.0],
    "beta": [0.0, 0.5, 1.0, 1.5, 2.0],
}
REFINED_STARTS = 8  # the best grid starts that L-BFGS refines


@dataclass(frozen=True)
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal_split(self, compute: float) -> tuple[float, float]:
        """``(N_opt, D_opt)`` minimising the loss at ``C = 6 N D = compute`` FLOPs."""
        total = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / total)
        n = g * (compute / 6.0) ** (self.beta / total)
        return n, compute / 6.0 / n

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _check(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> None:
    if not (len(n) == len(d) == len(loss)):
        raise ConfigError("N, D and loss must have one value per run each")
    if len(loss) < 5:
        raise ConfigError(f"the law has 5 parameters; fitting it needs at least 5 runs, got {len(loss)}")
    if not (np.all(n > 0) and np.all(d > 0) and np.all(loss > 0) and np.all(np.isfinite(loss))):
        raise ConfigError("N, D and loss must be positive and finite for every run")


def _objective(theta: torch.Tensor, log_n, log_d, log_loss, weights) -> torch.Tensor:
    """Summed Huber loss per parameter row of ``theta`` (rows: a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta.unbind(-1)
    terms = torch.stack(
        [
            a[..., None] - alpha[..., None] * log_n,
            b[..., None] - beta[..., None] * log_d,
            e[..., None].expand(*e.shape, log_n.shape[-1]),
        ]
    )
    residual = torch.logsumexp(terms, dim=0) - log_loss
    huber = torch.nn.functional.huber_loss(
        residual, torch.zeros_like(residual), reduction="none", delta=HUBER_DELTA
    )
    return (huber * weights).sum(-1)


def _refine(start: torch.Tensor, data: tuple) -> tuple[float, torch.Tensor]:
    theta = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [theta], max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        value = _objective(theta, *data)
        value.backward()
        return value

    optimizer.step(closure)
    with torch.no_grad():
        value = float(_objective(theta, *data))
    return (value if math.isfinite(value) else math.inf), theta.detach()


def _as_law(theta: torch.Tensor) -> Law:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def _fit_theta(n, d, loss, weights, starts: torch.Tensor, refine: int = REFINED_STARTS) -> torch.Tensor:
    data = tuple(torch.as_tensor(np.log(x), dtype=torch.float64) for x in (n, d, loss))
    data += (torch.as_tensor(weights, dtype=torch.float64),)
    with torch.no_grad():
        scores = _objective(starts, *data)
    best = torch.argsort(scores)[:refine]
    fits = [_refine(starts[i], data) for i in best]
    value, theta = min(fits, key=lambda fit: fit[0])
    # exp(700) is near float64's limit: a log-coefficient beyond it is a runaway fit, not a law.
    if not math.isfinite(value) or theta[3] <= 0 or theta[4] <= 0 or theta[:3].abs().max() > 700:
        raise ConfigError("the scaling-law fit found no decreasing law: the losses do not fall with N and D")
    return theta


def _grid_starts() -> torch.Tensor:
    return torch.tensor(list(itertools.product(*INIT_GRID.values())), dtype=torch.float64)


def fit_law(n, d, loss) -> Law:
    """The approach-3 law of runs with ``n`` parameters, ``d`` tokens and final loss ``loss``."""
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    _check(n, d, loss)
    return _as_law(_fit_theta(n, d, loss, np.ones_like(loss), _grid_starts()))


def bootstrap_laws(n, d, loss, law: Law, samples: int = 200, seed: int = 0) -> list[Law]:
    """Laws refitted on ``samples`` resamples of the runs (with replacement), started from ``law``.

    A resample is a multiplicity per run (a weight), so every refit sees the same arrays; the
    grid's best starts and ``law`` itself are the starting points.
    """
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    _check(n, d, loss)
    rng = np.random.default_rng(seed)
    fitted = torch.tensor(
        [math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta], dtype=torch.float64
    )
    starts = torch.cat([fitted[None], _grid_starts()])
    laws = []
    for _ in range(samples):
        weights = np.bincount(rng.integers(0, len(loss), len(loss)), minlength=len(loss)).astype(np.float64)
        try:
            laws.append(_as_law(_fit_theta(n, d, loss, weights, starts, refine=2)))
        except ConfigError:
            continue  # a degenerate resample (e.g. one size only) has no law; it is left out
    return laws


def interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``values``."""
    if not values:
        raise ConfigError("no bootstrap resample could be fitted, so there is no interval")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)
