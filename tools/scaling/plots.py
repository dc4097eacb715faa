"""PNG plots of a fit: loss against compute with the compute-optimal frontier, and the residuals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from megatron_patches.paths import atomic_file
from tools.scaling.law import Law


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_file(path) as temp:
        fig.savefig(temp, dpi=120, format="png")


def plot_frontier(
    results: list[dict[str, Any]], report: dict[str, Any], target: dict | None, path: Path
) -> None:
    """Each run's loss at its ``6ND``, coloured by N, and ``L(N_opt(C), D_opt(C))``; the target if any."""
    plt = _pyplot()
    law, key = Law(**report["law"]), f"{report['loss']}_loss"
    n = np.array([r["params"] for r in results], dtype=float)
    compute = 6.0 * n * np.array([r["tokens"] for r in results], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 5))
    dots = ax.scatter(compute, [r[key] for r in results], c=np.log10(n), cmap="viridis", zorder=3)
    fig.colorbar(dots, ax=ax, label="log10 N (non-embedding parameters)")
    high = max(compute.max(), target["compute"] if target else 0.0) * 3
    grid = np.logspace(np.log10(compute.min() / 3), np.log10(high), 200)
    ax.plot(grid, [law.loss(*law.optimal_split(c)) for c in grid], color="black", label="compute-optimal L")
    if target:
        low, up = target["loss_interval"]
        ax.errorbar(
            [target["compute"]],
            [target["loss"]],
            yerr=[[target["loss"] - low], [up - target["loss"]]],
            fmt="r*",
            markersize=12,
            label=f"prediction at C={target['compute']:.3g}",
        )
    ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel=f"{report['loss']} loss (nats/token)")
    ax.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)
    plt.close(fig)


def plot_residuals(results: list[dict[str, Any]], report: dict[str, Any], path: Path) -> None:
    """Relative residual ``loss / fitted - 1`` of each run against N, marker size by D."""
    plt = _pyplot()
    law, key = Law(**report["law"]), f"{report['loss']}_loss"
    n = np.array([r["params"] for r in results], dtype=float)
    d = np.array([r["tokens"] for r in results], dtype=float)
    residual = np.array([r[key] for r in results]) / law.loss(n, d) - 1.0
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(n, residual * 100, s=20 + 60 * (np.log(d) - np.log(d).min() + 0.1) / (np.ptp(np.log(d)) + 0.1))
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set(xscale="log", xlabel="N (non-embedding parameters)", ylabel="loss / fit - 1 (%)")
    ax.set_title("residuals of the approach-3 fit (marker size: tokens)")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # a few sizes: minor labels would overlap
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
