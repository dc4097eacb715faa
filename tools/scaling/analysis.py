"""``fit`` and ``predict`` on the grid's results: which fits the grid allows, and what they say at a budget.

``fit`` takes the finished points' results (``runner.collect``) and returns a
JSON-ready report: the approach-3 law with bootstrap intervals, approach 2 when
the grid has IsoFLOP budgets, learning-rate and batch-size laws when the grid
varied them (batch in tokens, as DeepSeek-LLM), a law per channel, and the
loss->benchmark sigmoid when accuracies are given. ``predict`` evaluates that
report at a compute budget ``C`` (FLOPs, ``C = 6 N D``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megatron_patches.errors import ConfigError
from tools.scaling.benchmark import Sigmoid, fit_sigmoid
from tools.scaling.isoflop import PowerLaw, fit_isoflop, fit_optimal_hparam
from tools.scaling.law import Law, bootstrap_laws, fit_law, interval

LOSS_KEYS = {"val": ("val_loss", "val_channels"), "train": ("train_loss", "channels")}
LAW_FIELDS = ("E", "A", "B", "alpha", "beta")


def _losses(results: list[dict[str, Any]], loss: str) -> np.ndarray:
    key = LOSS_KEYS[loss][0]
    missing = [r["name"] for r in results if r.get(key) is None]
    if missing:
        raise ConfigError(f"points {missing} have no {key} (no evaluation ran): fit with --loss train")
    return np.array([r[key] for r in results], dtype=np.float64)


def fit_report(
    results: list[dict[str, Any]],
    loss: str = "val",
    samples: int = 200,
    accuracies: dict[str, float] | None = None,
    chance: float | None = None,
) -> dict[str, Any]:
    """Every fit the finished runs ``results`` allow; ``accuracies`` maps point names to benchmark scores."""
    n = np.array([r["params"] for r in results], dtype=np.float64)
    d = np.array([r["tokens"] for r in results], dtype=np.float64)
    values = _losses(results, loss)
    law = fit_law(n, d, values)
    laws = bootstrap_laws(n, d, values, law, samples=samples)
    compute = np.array([r["flops"] for r in results], dtype=np.float64)
    isoflop = fit_isoflop(compute, n, values)
    batch_tokens = d / np.array([r["train_iters"] for r in results], dtype=np.float64)
    lr_law = fit_optimal_hparam(n * d * 6.0, [r["lr"] for r in results], values)
    batch_law = fit_optimal_hparam(n * d * 6.0, batch_tokens, values)
    report = {
        "loss": loss,
        "runs": len(results),
        "law": law.to_dict(),
        "intervals": {k: interval([getattr(b, k) for b in laws]) for k in LAW_FIELDS},
        "bootstrap": [b.to_dict() for b in laws],
        "isoflop": isoflop.to_dict() if isoflop else None,
        "lr_law": lr_law.to_dict() if lr_law else None,
        "batch_tokens_law": batch_law.to_dict() if batch_law else None,
        "channels": channel_laws(results, loss),
        "benchmark": None,
    }
    if accuracies:
        report["benchmark"] = benchmark_fit(results, values, accuracies, chance)
    return report


def channel_laws(results: list[dict[str, Any]], loss: str) -> dict[str, dict[str, Any]]:
    """The approach-3 law of each channel (point estimates), or why a channel has none."""
    key = LOSS_KEYS[loss][1]
    names = sorted({name for r in results for name in r.get(key, {})})
    laws = {}
    for name in names:
        rows = [r for r in results if name in r.get(key, {})]
        try:
            law = fit_law(
                [r["params"] for r in rows], [r["tokens"] for r in rows], [r[key][name] for r in rows]
            )
            laws[name] = law.to_dict()
        except ConfigError as err:
            laws[name] = {"error": str(err)}
    return laws


def benchmark_fit(results, values: np.ndarray, accuracies: dict[str, float], chance: float | None) -> dict:
    names = [r["name"] for r in results]
    unknown = sorted(set(accuracies) - set(names))
    if unknown:
        raise ConfigError(f"benchmark results name points the plan does not have: {unknown}")
    rows = [i for i, name in enumerate(names) if name in accuracies]
    sigmoid = fit_sigmoid(values[rows], [accuracies[names[i]] for i in rows], chance)
    return sigmoid.to_dict()


def predict(report: dict[str, Any], compute: float, level: float = 0.95) -> dict[str, Any]:
    """Compute-optimal N, D and loss at ``compute`` FLOPs, with bootstrap intervals and what follows."""
    if not compute > 0:
        raise ConfigError(f"the compute budget must be positive, got {compute}")
    law = Law(**report["law"])
    n_opt, d_opt = law.optimal_split(compute)
    boot = [Law(**b) for b in report["bootstrap"]]
    splits = [b.optimal_split(compute) for b in boot]
    losses = [b.loss(*split) for b, split in zip(boot, splits, strict=True)]
    loss = float(law.loss(n_opt, d_opt))
    out = {
        "compute": compute,
        "n_opt": n_opt,
        "d_opt": d_opt,
        "loss": loss,
        "loss_interval": interval(losses, level),
        "n_interval": interval([s[0] for s in splits], level),
        "d_interval": interval([s[1] for s in splits], level),
        "level": level,
    }
    for key in ("lr_law", "batch_tokens_law"):
        if report.get(key):
            out[key.removesuffix("_law")] = PowerLaw(**report[key])(compute)
    if report.get("isoflop"):
        out["isoflop_n_opt"] = PowerLaw(**report["isoflop"]["n_opt"])(compute)
    if report.get("benchmark"):
        sigmoid = Sigmoid(**report["benchmark"])
        out["accuracy"] = float(sigmoid.accuracy(loss))
        low, high = out["loss_interval"]
        out["accuracy_interval"] = (float(sigmoid.accuracy(high)), float(sigmoid.accuracy(low)))
    return out
