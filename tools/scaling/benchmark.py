"""Loss -> benchmark accuracy: a sigmoid of the loss, fitted on the grid's evaluations.

``accuracy(L) = floor + (ceiling - floor) * sigmoid(-slope * (L - midpoint))``:
near chance (``floor``) at a high loss, rising towards ``ceiling`` as the
loss falls. With the grid's points (their validation loss and their
``tools.eval bench`` accuracy), the big run's predicted loss then gives its
predicted accuracy (the guide's third stage). ``floor`` is the chance level
when given (e.g. 0.25 for four options), else fitted. Least squares with
L-BFGS from several starts; the parameters live in unconstrained forms so
``0 <= floor <= ceiling <= 1`` and ``slope > 0`` always hold.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_patches.errors import ConfigError


@dataclass(frozen=True)
class Sigmoid:
    floor: float
    ceiling: float
    slope: float
    midpoint: float

    def accuracy(self, loss: float | np.ndarray) -> float | np.ndarray:
        z = np.clip(self.slope * (np.asarray(loss) - self.midpoint), -60, 60)
        return self.floor + (self.ceiling - self.floor) / (1.0 + np.exp(z))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _unpack(theta: torch.Tensor, chance: float | None):
    floor = torch.sigmoid(theta[0]) if chance is None else torch.tensor(chance, dtype=theta.dtype)
    ceiling = floor + (1 - floor) * torch.sigmoid(theta[1])
    return floor, ceiling, torch.nn.functional.softplus(theta[2]), theta[3]


def fit_sigmoid(loss, accuracy, chance: float | None = None) -> Sigmoid:
    """The sigmoid of ``loss`` closest (least squares) to ``accuracy``; needs 4 runs or more."""
    loss, accuracy = np.asarray(loss, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    if len(loss) != len(accuracy) or len(loss) < 4:
        raise ConfigError(f"the loss->accuracy fit needs at least 4 runs with both, got {len(loss)}")
    if not (np.all(np.isfinite(loss)) and np.all((accuracy >= 0) & (accuracy <= 1))):
        raise ConfigError("benchmark accuracies must lie in [0, 1] and losses be finite")
    if chance is not None and not 0 <= chance < 1:
        raise ConfigError(f"the chance level must lie in [0, 1), got {chance}")
    x, y = torch.as_tensor(loss), torch.as_tensor(accuracy)
    spread = float(loss.max() - loss.min()) or 1.0
    best = (math.inf, None)
    for midpoint in np.quantile(loss, [0.1, 0.5, 0.9]):
        for slope in (1.0 / spread, 5.0 / spread, 20.0 / spread):
            start = [0.0, 0.0, math.log(math.expm1(slope)), float(midpoint)]
            best = min(
                best, _refine(torch.tensor(start, dtype=torch.float64), x, y, chance), key=lambda r: r[0]
            )
    floor, ceiling, slope, midpoint = (float(v) for v in _unpack(best[1], chance))
    return Sigmoid(floor=floor, ceiling=ceiling, slope=slope, midpoint=midpoint)


def _refine(start: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chance: float | None):
    theta = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], max_iter=300, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        floor, ceiling, slope, midpoint = _unpack(theta, chance)
        predicted = floor + (ceiling - floor) * torch.sigmoid(-slope * (x - midpoint))
        return ((predicted - y) ** 2).sum()

    def closure():
        optimizer.zero_grad()
        value = objective()
        value.backward()
        return value

    optimizer.step(closure)
    with torch.no_grad():
        value = float(objective())
    return (value if math.isfinite(value) else math.inf), theta.detach()


def read_accuracy(path: Path) -> float:
    """Accuracy of a ``tools.eval bench --out`` records file (JSONL, one ``correct`` per item)."""
    try:
        records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
        marks = [bool(record["correct"]) for record in records]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is not a tools.eval bench records file: {err}") from None
    if not marks:
        raise ConfigError(f"{path} holds no scored items")
    return sum(marks) / len(marks)
