"""The usage-count format: ``<checkpoint>/usage/``, how often a run read each document of each prefix.

The trainer writes it at every checkpoint (``training/data_usage.py``); ``data.preprocess drop-used``
reads it to build the next blend without the most-read documents. Layout::

    usage/usage.json          {"iteration": N, "dtype": "uint16", "saturates_at": 65535,
                               "channels": {name: {"prefix", "file", "documents", "uses", "documents_used"}}}
    usage/<i>_<prefix name>.npy   uses of document d (sequence d of the prefix's .idx) at [d]

Counts saturate at 65535 (``uint16``: 2 bytes per document, 20 MB for 10M documents).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_patches import paths
from megatron_patches.errors import ConfigError

USAGE_DIR = "usage"
MANIFEST = "usage.json"
COUNT_DTYPE = np.dtype(np.uint16)


@dataclass(frozen=True)
class ChannelUsage:
    name: str
    prefix: str  # absolute, as the run read it
    counts: np.ndarray  # uses per document, saturated at COUNT_DTYPE's maximum


def write_usage(
    directory: Path, counts: dict[str, np.ndarray], names: dict[str, str], iteration: int
) -> None:
    """``directory/usage/``: a saturating ``uint16`` array per prefix and the manifest, atomically."""
    limit = np.iinfo(COUNT_DTYPE).max
    with paths.atomic_dir(Path(directory) / USAGE_DIR, replace=True) as temp:
        entries = {}
        for i, (prefix, uses) in enumerate(sorted(counts.items())):
            file = f"{i}_{Path(prefix).name}.npy"
            np.save(temp / file, np.minimum(uses, limit).astype(COUNT_DTYPE))
            entries[names.get(prefix, Path(prefix).name)] = {
                "prefix": str(Path(prefix).resolve()),
                "file": file,
                "documents": len(uses),
                "uses": int(uses.sum()),
                "documents_used": int((uses > 0).sum()),
            }
        manifest = {"iteration": iteration, "dtype": COUNT_DTYPE.name, "saturates_at": int(limit)}
        paths.write_json_atomic(temp / MANIFEST, {**manifest, "channels": entries})


def read_usage(directory: Path) -> dict[str, ChannelUsage]:
    """The counts of a ``usage`` directory (or of the checkpoint holding one), by channel name."""
    directory = Path(directory)
    if (directory / USAGE_DIR / MANIFEST).is_file():
        directory = directory / USAGE_DIR
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"{directory} holds no {MANIFEST}: give a checkpoint's {USAGE_DIR} directory")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entries = manifest["channels"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{manifest_path} is not a usage manifest") from None
    usage = {}
    for name, entry in entries.items():
        counts = _counts(directory / str(entry.get("file")), entry.get("documents"))
        usage[name] = ChannelUsage(name, entry["prefix"], counts)
    return usage


def _counts(path: Path, documents: int) -> np.ndarray:
    try:
        counts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"usage counts {path} cannot be read: {str(err).splitlines()[0]}") from None
    if counts.shape != (documents,):
        raise ConfigError(
            f"usage counts {path} hold {counts.shape[0]} documents, {MANIFEST} says {documents}"
        )
    return counts
