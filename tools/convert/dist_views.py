"""Zero-copy views of the tensor chunks a ``torch_dist`` checkpoint stores, from its mapped ``.distcp`` files.

``torch.distributed.checkpoint``'s ``FileSystemReader.read_data`` reads a stored chunk into
memory, ``torch.load``-s it and copies it into the destination: two copies of every byte
before a converter has done anything with it. Each chunk is one ``torch.save`` archive at
(``offset``, ``length``) of its file (``Metadata.storage_data``), its storage stored
uncompressed, so a mapped file holds the tensor as it is: ``torch.load(map_location="meta",
weights_only=True)`` of the archive reads only its pickle and tells where the storage starts
(``_checkpoint_offset``), and :meth:`MappedChunks.view` hands out those pages as a tensor.

Only a region that is exactly one stored chunk, untransformed, contiguous and of the dtype
asked for is viewed; anything else gives None and the caller reads it the DCP way
(:func:`megatron_patches.safe_load.read_region`). The checkpoint must have passed
:func:`megatron_patches.safe_load.verify_torch_dist` (shard sizes checked against the metadata).

Public API: :class:`MappedChunks`.
"""

from __future__ import annotations

import io
import mmap
from pathlib import Path
from typing import Any

import torch

from megatron_patches.errors import ConfigError
from tools.convert.readahead import read_ahead


class _Slice(io.RawIOBase):
    """``length`` bytes of ``buffer`` from ``start`` as a seekable file (what ``torch.load`` reads)."""

    def __init__(self, buffer: mmap.mmap, start: int, length: int) -> None:
        super().__init__()
        self._buffer, self._start, self._length, self._position = buffer, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + position)
        return self._position

    def readinto(self, target: Any) -> int:
        count = max(0, min(len(target), self._length - self._position))
        begin = self._start + self._position
        target[:count] = self._buffer[begin : begin + count]
        self._position += count
        return count


class MappedChunks:
    """Views of the stored chunks of a vetted torch_dist checkpoint.

    Each view maps its own archive's pages, unmapped when the last tensor using it is freed,
    so memory stays at the views a caller holds, however many it has read."""

    def __init__(self, iter_dir: str | Path, metadata: Any) -> None:
        self.iter_dir = Path(iter_dir)
        self._storage = metadata.storage_data  # MetadataIndex(fqn, offsets) -> _StorageInfo

    def view(
        self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The stored chunk of ``key`` at ``offsets``, if it is exactly ``sizes`` of ``dtype``; else None."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self._storage.get(MetadataIndex(key, torch.Size(offsets)))
        if info is None or getattr(info, "transform_descriptors", None) or info.length == 0:
            return None
        skip = info.offset % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page
        with open(self.iter_dir / info.relative_path, "rb") as handle:
            pages = mmap.mmap(
                handle.fileno(), skip + info.length, offset=info.offset - skip, access=mmap.ACCESS_COPY
            )
        stored = self._layout(_Slice(pages, skip, info.length), info, key)
        where = getattr(stored.untyped_storage(), "_checkpoint_offset", None)
        same = stored.dtype == dtype and tuple(stored.shape) == tuple(sizes) and stored.numel() > 0
        if not (same and stored.is_contiguous()) or where is None:
            return None
        begin = skip + where + stored.storage_offset() * dtype.itemsize
        nbytes = stored.numel() * dtype.itemsize
        if begin + nbytes > skip + info.length:
            raise ConfigError(f"{self.iter_dir / info.relative_path}: entry {key} ends past its extent")
        # Copy-on-write, as torch.load(mmap=True) maps: a caller writing into a view changes no file.
        view = torch.frombuffer(pages, dtype=dtype, count=stored.numel(), offset=begin).view(stored.shape)
        read_ahead([view])
        return view

    def _layout(self, archive: _Slice, info: Any, key: str) -> torch.Tensor:
        """The stored tensor's shape, strides and dtype, from its archive's pickle alone (weights only)."""
        try:
            stored = torch.load(archive, map_location="meta", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged archive
            where = self.iter_dir / info.relative_path
            raise ConfigError(f"cannot read {where} (entry {key}): {str(err).splitlines()[0]}") from None
        if not isinstance(stored, torch.Tensor):
            raise ConfigError(f"{self.iter_dir / info.relative_path}: entry {key} is not a tensor")
        return stored
