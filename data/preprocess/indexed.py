"""Megatron-Core `IndexedDataset` files (`.bin` + `.idx`), written in constant memory.

The format itself (header, dtype codes) is `megatron_patches.formats.indexed`; this is the writer.

`megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder` keeps every sequence length in a
Python list until `finalize`, which is what makes Megatron-LM's preprocessing run out of memory on
big inputs. Here each worker appends tokens to a `.bin` part and lengths to a `.len` part (int32),
and :func:`merge_parts` concatenates the parts and streams the index in fixed-size chunks. The
result is byte-for-byte what the builder writes for one `add_item` + `end_document` per document
(one sequence per document), which the tests check against the builder itself.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatron_patches.formats.indexed import pack_header
from megatron_patches.paths import atomic_file

_CHUNK = 1 << 22  # index entries per streamed chunk


class PartWriter:
    """Appends documents to `<stem>.bin` and their lengths (in tokens) to `<stem>.len`."""

    def __init__(self, stem: Path, dtype: np.dtype):
        self.stem, self.dtype = stem, dtype
        self._bin = open(f"{stem}.bin", "wb")  # noqa: SIM115
        self._len = open(f"{stem}.len", "wb")  # noqa: SIM115
        self.documents = self.tokens = 0

    def add(self, docs: Sequence[bytes], suffix: bytes = b"") -> int:
        """Append documents given packed (the bytes of their ids in this writer's dtype), each followed
        by `suffix` (the packed EOD, or nothing); returns the number of tokens written."""
        sizes = [len(doc) + len(suffix) for doc in docs]
        itemsize = self.dtype.itemsize
        if any(size % itemsize for size in sizes):
            raise ValueError(f"{self.stem}: a packed document is not a whole number of {self.dtype}")
        lengths = array("i", [size // itemsize for size in sizes])
        if docs:
            self._bin.write(suffix.join(docs))
            self._bin.write(suffix)
        self._len.write(lengths.tobytes())
        tokens = sum(sizes) // itemsize
        self.documents += len(docs)
        self.tokens += tokens
        return tokens

    def close(self) -> None:
        self._bin.close()
        self._len.close()


def _copy(src: Path, dst) -> None:
    with open(src, "rb") as handle:
        while chunk := handle.read(1 << 24):
            dst.write(chunk)


def merge_parts(stems: Sequence[Path], prefix: Path, dtype: np.dtype) -> tuple[int, int]:
    """Concatenate parts (in order) into `<prefix>.bin/.idx`; returns (documents, tokens)."""
    return merge_indexed([(Path(f"{s}.bin"), part_lengths(Path(f"{s}.len"))) for s in stems], prefix, dtype)


def part_lengths(lengths_file: Path) -> np.ndarray:
    """The sequence lengths a `.len` part holds (int32, memory-mapped)."""
    if not lengths_file.stat().st_size:
        return np.zeros(0, np.int32)
    return np.memmap(lengths_file, dtype=np.int32, mode="r")


def merge_indexed(parts: Sequence[tuple[Path, np.ndarray]], prefix: Path, dtype: np.dtype) -> tuple[int, int]:
    """Concatenate `.bin` files (in order), each with its documents' lengths in tokens (a `.len` part's
    or an `.idx`'s, memory-mapped), into `<prefix>.bin/.idx`; returns (documents, tokens)."""
    count = sum(int(lengths.size) for _, lengths in parts)
    with atomic_file(f"{prefix}.bin") as bin_tmp, atomic_file(f"{prefix}.idx") as idx_tmp:
        with open(bin_tmp, "wb") as out:
            for bin_path, _ in parts:
                _copy(bin_path, out)
        tokens = _write_index(idx_tmp, [lengths for _, lengths in parts], count, dtype)
        expected = tokens * dtype.itemsize
        if bin_tmp.stat().st_size != expected:
            raise RuntimeError(f"{bin_tmp}: {bin_tmp.stat().st_size} bytes, index says {expected}")
    return count, tokens


def _write_index(path: Path, lengths_list: list[np.ndarray], count: int, dtype: np.dtype) -> int:
    """Write the `.idx` of `count` sequences of these lengths; returns the token count."""
    itemsize = dtype.itemsize
    tokens = 0
    with open(path, "wb") as idx:
        idx.write(pack_header(dtype, count, count + 1))  # document_indices entries: 0, 1, ..., count
        for lengths in lengths_list:
            for chunk in _chunks(lengths):
                idx.write(chunk.astype(np.int32).tobytes())
        for lengths in lengths_list:  # byte offset of every sequence
            for chunk in _chunks(lengths):
                pointers = np.cumsum(chunk, dtype=np.int64) - chunk + tokens
                idx.write((pointers * itemsize).astype(np.int64).tobytes())
                tokens += int(chunk.sum(dtype=np.int64))
        for start in range(0, count + 1, _CHUNK):
            idx.write(np.arange(start, min(count + 1, start + _CHUNK), dtype=np.int64).tobytes())
    return tokens


def _chunks(lengths: np.ndarray):
    for start in range(0, lengths.size, _CHUNK):
        yield np.asarray(lengths[start : start + _CHUNK], dtype=np.int64)
