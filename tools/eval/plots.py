"""Matplotlib without a display, and PNGs written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from megatron_patches import paths

if TYPE_CHECKING:
    from types import ModuleType

    from matplotlib.figure import Figure


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Figure, path: str | Path) -> None:
    """Write ``fig`` to ``path`` through a temporary file, then close it."""
    path = Path(path)
    fig.tight_layout()
    with paths.atomic_file(path) as temp:  # the format from the final name: the temporary one ends in .tmp
        fig.savefig(temp, dpi=120, format=path.suffix.lstrip(".") or "png")
    pyplot().close(fig)
