"""Check a Megatron ``.bin/.idx`` pair before training touches it.

Megatron-Core's ``IndexedDataset`` asserts on a bad header deep inside dataset
building (on some ranks, mid-collective) and reads past the end of a truncated
``.bin`` only when a sample lands there. :func:`check_prefix` reads the index
header and lengths (a few KB, memory-mapped) and fails with one line naming the
file and what is wrong with it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from megatron_patches.errors import ConfigError

INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER
DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # indexed_dataset.DType codes
_FIXED = len(INDEX_HEADER) + 8 + 1 + 8 + 8


def check_prefix(prefix: str) -> int:
    """Validate ``prefix.idx`` and ``prefix.bin``; return the number of documents."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise ConfigError(f"data prefix {prefix}: {path} does not exist")
    with idx.open("rb") as stream:
        head = stream.read(_FIXED)
    if len(head) < _FIXED or head[: len(INDEX_HEADER)] != INDEX_HEADER:
        raise ConfigError(f"{idx} is not a Megatron index file (bad or truncated header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[len(INDEX_HEADER) :])
    if version != 1 or code not in DTYPE_SIZES:
        raise ConfigError(f"{idx}: unsupported index version {version} or dtype code {code}")
    expected = _FIXED + sequences * (4 + 8) + documents * 8
    if idx.stat().st_size < expected:
        raise ConfigError(f"{idx} is truncated: {idx.stat().st_size} bytes, its header needs {expected}")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=_FIXED, shape=(sequences,))
    needed = int(lengths.sum(dtype=np.int64)) * DTYPE_SIZES[code]
    if bin_.stat().st_size != needed:
        raise ConfigError(f"{bin_} holds {bin_.stat().st_size} bytes but {idx} indexes {needed}")
    return max(documents - 1, 0)


def token_count(prefix: str) -> int:
    """Tokens in ``prefix.bin`` (its size over the token width the ``.idx`` header names), for the plan.

    O(1): a 7B run's blend has billions of tokens in millions of documents; the sizes are not summed.
    Call after :func:`check_prefix`.
    """
    with Path(prefix + ".idx").open("rb") as stream:
        code = stream.read(_FIXED)[len(INDEX_HEADER) + 8]
    return Path(prefix + ".bin").stat().st_size // DTYPE_SIZES[code]
