"""TEMPORARY stand-in until the converter branch lands (it owns the real layout module)."""

from __future__ import annotations

import os
from pathlib import Path

TRACKER_NAME = "latest_checkpointed_iteration.txt"


def iteration_dir_name(iteration) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def read_tracker(root):
    path = Path(root) / TRACKER_NAME
    if not path.is_file():
        return None
    text = path.read_text().strip()
    return text if text == "release" else int(text)


def write_tracker(root, iteration) -> None:
    path = Path(root) / TRACKER_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, path)


def is_torch_dist(path) -> bool:
    return (Path(path) / "metadata.json").is_file()
