"""Tiny learnable corpora in Megatron's .bin/.idx format, for trainer tests."""

from pathlib import Path

import numpy as np
import torch

EOD = 0


def write_corpus(directory: Path, name: str, docs: int, vocab: int, seed: int, period: int = 5) -> str:
    """Documents of repeating token cycles (so loss can fall), each ending in EOD.

    Each channel gets its own cycle structure (``period``) so channels have
    different losses. Returns the prefix (``<dir>/<name>_text_document``).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    directory.mkdir(parents=True, exist_ok=True)
    prefix = str(directory / f"{name}_text_document")
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(docs):
        start = int(rng.integers(1, vocab - period))
        length = int(rng.integers(20, 120))
        cycle = start + np.arange(length) % period
        builder.add_item(torch.from_numpy(np.append(cycle, EOD).astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix
