"""Megatron-Core's ``.bin/.idx`` indexed-dataset format: its constants, header and checks.

The data pipeline writes these files (``data/preprocess/indexed.py``), the
trainer and ``tools/eval`` read them; this module is the one place that knows
the layout. Megatron-Core's ``IndexedDataset`` asserts on a bad header deep
inside dataset building (on some ranks, mid-collective) and reads past the end
of a truncated ``.bin`` only when a sample lands there. :func:`check_prefix`
reads the index header and lengths (a few KB, memory-mapped) and fails with one
line naming the file and what is wrong with it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from megatron_patches.errors import ConfigError

INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER
INDEX_VERSION = 1
DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # indexed_dataset.DType codes
TOKEN_DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}  # the two token dtypes Megatron picks
DOCUMENT_SUFFIX = "_text_document"  # Megatron-LM's prefix naming: <channel>_text_document.{bin,idx}
_FIELDS = "<QBQQ"  # version, dtype code, sequence count, document-index entries
HEADER_SIZE = len(INDEX_HEADER) + struct.calcsize(_FIELDS)


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype Megatron's ``DType.optimal_dtype(vocab_size)`` picks."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def pack_header(dtype: np.dtype, sequences: int, document_entries: int) -> bytes:
    """The fixed ``.idx`` header; sequence lengths, pointers and document indices follow it."""
    return INDEX_HEADER + struct.pack(
        _FIELDS, INDEX_VERSION, TOKEN_DTYPE_CODES[np.dtype(dtype)], sequences, document_entries
    )


def check_prefix(prefix: str) -> int:
    """Validate ``prefix.idx`` and ``prefix.bin``; return the number of documents."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise ConfigError(f"data prefix {prefix}: {path} does not exist")
    with idx.open("rb") as stream:
        head = stream.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE or head[: len(INDEX_HEADER)] != INDEX_HEADER:
        raise ConfigError(f"{idx} is not a Megatron index file (bad or truncated header)")
    version, code, sequences, documents = struct.unpack(_FIELDS, head[len(INDEX_HEADER) :])
    if version != INDEX_VERSION or code not in DTYPE_SIZES:
        raise ConfigError(f"{idx}: unsupported index version {version} or dtype code {code}")
    expected = HEADER_SIZE + sequences * (4 + 8) + documents * 8
    if idx.stat().st_size < expected:
        raise ConfigError(f"{idx} is truncated: {idx.stat().st_size} bytes, its header needs {expected}")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=HEADER_SIZE, shape=(sequences,))
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
        code = stream.read(HEADER_SIZE)[len(INDEX_HEADER) + 8]
    return Path(prefix + ".bin").stat().st_size // DTYPE_SIZES[code]


def document_lengths(prefix: str) -> tuple[np.dtype, np.ndarray]:
    """The token dtype and the per-document lengths (memory-mapped int32) of ``prefix.idx``, for
    merging indexed files; refused in one line unless every document is one sequence (what
    ``data.preprocess tokenize`` writes). Call after :func:`check_prefix`."""
    idx = Path(prefix + ".idx")
    with idx.open("rb") as stream:
        _, code, sequences, documents = struct.unpack(_FIELDS, stream.read(HEADER_SIZE)[len(INDEX_HEADER) :])
    dtypes = {code: dtype for dtype, code in TOKEN_DTYPE_CODES.items()}
    if code not in dtypes or documents != sequences + 1:
        raise ConfigError(f"{idx}: not one sequence per document in uint16/int32 (not written by tokenize)")
    if not sequences:
        return dtypes[code], np.zeros(0, np.int32)
    return dtypes[code], np.memmap(idx, dtype=np.int32, mode="r", offset=HEADER_SIZE, shape=(sequences,))
