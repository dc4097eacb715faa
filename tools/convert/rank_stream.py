"""A legacy rank file (``torch.save`` zip) written tensor by tensor, so no rank is ever whole in memory.

``torch.save`` pickles a state dict and then writes every storage it met, so all of a
rank's tensors must exist at once, each with a storage of its own (a view saves its
whole base: a 5 GB mapped shard file for one TP slice), and nothing is written until
the last one is made. A zip archive finds records through its central directory, so
their order is free: :class:`StreamedRankFile` writes each tensor's bytes as record
``data/<k>`` the moment it arrives, on a :class:`~tools.convert.background.BackgroundWriter`
thread with at most ``depth`` tensors queued, straight from the tensor's memory (a
contiguous view of a mapped input is written without a copy), and hands back a
placeholder of the same dtype and shape whose storage is untouched anonymous memory.
:meth:`StreamedRankFile.close` then lets ``torch.serialization._save`` (what ``torch.save``
runs, torch 2.13) pickle the state dict holding the placeholders and write the small
records, skipping the data records already written: ``_save`` numbers storages in the
order it meets them, which is the order they were added, and each skipped record is
checked to be that placeholder's.
The file reads back with ``torch.load`` (``mmap`` or not) exactly as ``torch.save``'s.
"""

from __future__ import annotations

import inspect
import mmap
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.serialization import config as serialization_config

from tools.convert.background import BackgroundWriter

_SAVE_PARAMS = ["obj", "zip_file", "pickle_module", "pickle_protocol", "_disable_byteorder_record"]
_PICKLE_PROTOCOL = 2  # torch.save's default


def _check_torch_api() -> None:
    params = list(inspect.signature(torch.serialization._save).parameters)
    if params != _SAVE_PARAMS:
        raise RuntimeError(f"torch.serialization._save takes {params}, not {_SAVE_PARAMS}: torch changed")


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor like ``tensor`` over its own untouched anonymous mapping: no memory until written to."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return torch.empty(tensor.shape, dtype=tensor.dtype)
    raw = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)
    return raw.view(tensor.dtype).view(tensor.shape)


class StreamedRankFile:
    """``add`` each tensor of the state dict as it is made, then ``close`` with the whole state."""

    def __init__(self, path: str | Path, depth: int = 2) -> None:
        _check_torch_api()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # No CRC32: torch.load never checks it, and it costs more CPU than the write.
        self._zip = torch._C.PyTorchFileWriter(
            str(self.path), False, serialization_config.save.storage_alignment
        )
        self._writer = BackgroundWriter(depth)
        self._placeholders: list[torch.Tensor] = []

    def __enter__(self) -> StreamedRankFile:
        return self

    def __exit__(self, *failure: object) -> None:
        if failure[0] is not None:
            self._writer.abort()  # the file stays incomplete inside the caller's temporary directory

    def add(self, tensor: torch.Tensor) -> torch.Tensor:
        """Queue ``tensor``'s bytes (contiguous) for writing; return the placeholder to put in the state."""
        if not tensor.is_contiguous():
            raise ValueError("StreamedRankFile.add needs a contiguous tensor")
        key, nbytes = len(self._placeholders), tensor.numel() * tensor.element_size()
        zip_file = self._zip
        # A storage of exactly the tensor's bytes (numpy's view of them), wherever the tensor starts.
        exact = torch.from_numpy(tensor.reshape(-1).view(torch.uint8).numpy()).untyped_storage()

        def write() -> None:
            zip_file.write_record(f"data/{key}", exact, nbytes)

        self._writer.submit(write)
        self._placeholders.append(_placeholder(tensor))
        return self._placeholders[-1]

    def add_state(self, entries: dict[str, Any]) -> dict[str, Any]:
        """``entries`` with each tensor value :meth:`add`-ed (``_extra_state``), the rest as they are."""
        return {k: self.add(v) if isinstance(v, torch.Tensor) else v for k, v in entries.items()}

    def after_written(self, release: Callable[[], None]) -> Callable[[], None]:
        """A function that, each time it is called, defers ``release`` until every tensor added so far
        is written (``BackgroundWriter.defer``): the rank's tensors may be views of the pages it drops."""
        return lambda: self._writer.defer(release)

    def close(self, state: dict[str, Any]) -> None:
        """Wait for the data records, then pickle ``state`` (holding the placeholders) and finish the zip."""
        self._writer.drain()
        torch.serialization._save(
            state, _SkipWritten(self._zip, self._placeholders), pickle, _PICKLE_PROTOCOL, False
        )
        self._zip.write_end_of_file()
        self._placeholders.clear()


class _SkipWritten:
    """The zip writer ``_save`` sees: records ``data/<k>`` of the placeholders were written already."""

    def __init__(self, zip_file: Any, placeholders: list[torch.Tensor]) -> None:
        self._zip = zip_file
        self._placeholders = placeholders

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        key = name.removeprefix("data/")
        if name.startswith("data/") and key.isdigit() and int(key) < len(self._placeholders):
            placeholder = self._placeholders[int(key)]
            if not isinstance(data, torch.UntypedStorage) or data.data_ptr() != placeholder.data_ptr():
                raise RuntimeError(
                    f"{name}: torch.save numbered the storages differently than they were added"
                )
            return
        self._zip.write_record(name, data, nbytes)
