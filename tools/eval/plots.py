"""Matplotlib without a display, and PNGs written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

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
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    pyplot().close(fig)
    os.replace(tmp, path)
