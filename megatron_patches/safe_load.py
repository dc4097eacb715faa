"""Read a checkpoint's pickles without letting them run code, and vet a torch_dist directory first.

``pickle`` calls whatever a file names, so a checkpoint from elsewhere could run
``os.system`` the moment it is read. PyTorch's ``FileSystemReader`` unpickles a
``torch_dist`` checkpoint's ``.metadata`` with plain ``pickle`` and its
``BYTE_IO`` entries (Megatron-Core's ``ShardedObject``s: RNG states, ``_extra_state``)
with ``torch.load(weights_only=False)``, and reads shards without checking their
size. :func:`verify_torch_dist` therefore reads all of those itself first: the
metadata through :class:`_MetadataUnpickler`, which admits only the classes such
metadata is made of, every ``BYTE_IO`` entry and ``common.pt`` with
``torch.load(weights_only=True)``, and every shard's size against the metadata.
Only a directory that passes is handed to Megatron-Core. A vetted directory is
remembered by the size and mtime of its files, so the trainer's repeated reads
(plan, then load, on every rank) vet it once per process.

Megatron-LM stores its ``argparse.Namespace`` (``args``) in rank files and
``common.pt``; :func:`safe_torch_load` admits that class and Megatron-Core's
enums (``AttnBackend`` ...) besides what ``weights_only`` admits, nothing else.

Every torch_dist read of the project goes through :func:`load_common`,
:func:`load_sharded` and :func:`read_region` (one piece of one stored tensor, for
readers that stream), which vet first (``tests/megatron_patches/test_safe_load.py``
fails on a direct ``dist_checkpointing`` read elsewhere).

Public API: :func:`load_common`, :func:`load_sharded`, :func:`read_region`, :func:`verify_torch_dist`,
:class:`Vetted`, :func:`read_metadata`, :func:`safe_torch_load`.
"""

from __future__ import annotations

import argparse
import copy
import enum
import functools
import importlib
import io
import itertools
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch

from megatron_patches.errors import ConfigError

METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
_REFUSE = "which no checkpoint holds; refusing to load it (unpickling it could run code)"
# What torch.distributed.checkpoint's Metadata pickles into (torch 2.1-2.13), Megatron-Core's
# ``all_local_plans`` cache (SavePlan, WriteItem) included; torch dtypes, layouts and memory
# formats are admitted by type in ``find_class``.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan",
        "WriteItem",
        "WriteItemType",
        "TensorWriteData",
        "BytesIOWriteData",
    },
    "torch.serialization": {"_get_layout"},  # layout by name, from a fixed table
    "torch": {"Size"},
    "builtins": {"set", "frozenset", "slice"},
    "collections": {"OrderedDict"},
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)
# Modules whose Enum classes Megatron-LM's args hold (attention_backend, fp8_recipe, cuda_graph_scope ...).
_ARGS_ENUM_MODULES = ("megatron.core.enums", "megatron.core.transformer.enums")
_ZIP_MAGIC = b"PK\x03\x04"
_BLOCKED_GLOBAL = re.compile(r"GLOBAL (\S+)")
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


class Vetted(NamedTuple):
    """A torch_dist directory that passed :func:`verify_torch_dist`: its metadata and common state."""

    metadata: Any  # torch.distributed.checkpoint.metadata.Metadata
    common: dict  # shared by every caller: read it, or take a copy with load_common

    def tensor_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype of every stored tensor, by checkpoint key (pickled entries left out)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        entries = self.metadata.state_dict_metadata.items()
        return {k: v.properties.dtype for k, v in entries if isinstance(v, TensorStorageMetadata)}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], where: Path) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise ConfigError(f"{self.where} pickles {module}.{name}, {_REFUSE}")


def read_metadata(path: str | Path) -> Any:
    """A torch_dist ``.metadata`` file, unpickled with only the classes such metadata is made of."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    path = Path(path)
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file, path).load()
    except FileNotFoundError:
        raise ConfigError(f"incomplete torch_dist checkpoint: {path} is missing") from None
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged pickle raises many types
        raise ConfigError(f"cannot read {path}: {_reason(err)}") from None
    storage = getattr(metadata, "storage_data", None)
    if not (
        isinstance(metadata, Metadata)
        and isinstance(metadata.state_dict_metadata, dict)
        and isinstance(storage, dict)
        and all(isinstance(i, MetadataIndex) and isinstance(s, _StorageInfo) for i, s in storage.items())
    ):
        raise ConfigError(f"{path} is not torch_dist checkpoint metadata")
    return metadata


def safe_torch_load(source: str | Path | bytes, where: str | Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a file or of bytes; any failure is one line naming ``where``."""
    try:
        try:
            return _weights_only_load(source, [argparse.Namespace], mmap)
        except pickle.UnpicklingError:
            # Only a pickle naming a class beyond these needs Megatron-Core's enums and the classes it
            # registers with torch on import (megatron.core.safe_globals): importing it costs seconds
            # of every converter's start-up, so it happens only then.
            return _weights_only_load(source, _args_classes(), mmap)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint file not found: {where}") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ConfigError(f"cannot read {where}: {_reason(err)}") from None


def _weights_only_load(source: str | Path | bytes, classes: list[type], mmap: bool) -> Any:
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    with torch.serialization.safe_globals(classes):
        return torch.load(stream, map_location="cpu", mmap=mmap, weights_only=True)


@functools.cache
def _args_classes() -> list[type]:
    """``argparse.Namespace`` and the Enum classes of :data:`_ARGS_ENUM_MODULES` (data, not code)."""
    classes: list[type] = [argparse.Namespace]
    for name in _ARGS_ENUM_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # the converter's pure paths run without Megatron-Core
            continue
        found = [c for c in vars(module).values() if isinstance(c, type) and c.__module__ == name]
        classes += [c for c in found if issubclass(c, enum.Enum)]
    return classes


def _reason(err: Exception) -> str:
    """The line of a (multi-line) load error that says what is wrong."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and (blocked := _BLOCKED_GLOBAL.search(text)):
        return f"it pickles {blocked.group(1)}, {_REFUSE}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
    return (useful or lines or [type(err).__name__])[0].rstrip(": ")


_vetted: dict[Path, tuple[tuple, Vetted]] = {}


def load_common(iter_dir: str | Path) -> dict:
    """The common (non-sharded) state of a vetted torch_dist checkpoint; a copy, the caller's to change."""
    return copy.deepcopy(verify_torch_dist(iter_dir).common)


def load_sharded(sharded_state_dict: dict, iter_dir: str | Path) -> dict:
    """``dist_checkpointing.load`` of a torch_dist checkpoint, once :func:`verify_torch_dist` passed it."""
    from megatron.core import dist_checkpointing

    verify_torch_dist(iter_dir)
    with torch.serialization.safe_globals(_args_classes()):  # common.pt's args, vetted just above
        return dist_checkpointing.load(sharded_state_dict, str(iter_dir))


def read_region(iter_dir: str | Path, key: str, offsets: tuple[int, ...], into: torch.Tensor) -> None:
    """Fill ``into`` with the region of stored tensor ``key`` starting at ``offsets``; nothing else is read.

    ``torch.distributed.checkpoint.load`` with a one-region plan, fed the vetted metadata (the
    reader never unpickles ``.metadata`` itself); stored chunks are cast to ``into``'s dtype.
    """
    # torch.distributed.checkpoint is imported here, not at the top: it is a third of the start-up of
    # every command that imports this module (tools.convert's legacy conversions never need it).
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata

    vetted = verify_torch_dist(iter_dir)
    stored = vetted.metadata.state_dict_metadata.get(key)
    if not isinstance(stored, TensorStorageMetadata):
        raise ConfigError(f"{iter_dir} holds no tensor {key}")
    ends = [o + n for o, n in zip(offsets, into.shape, strict=True)]
    if any(end > size for end, size in zip(ends, stored.size, strict=True)):
        raise ConfigError(f"{iter_dir}: {key} is {list(stored.size)}, too small for {ends}")

    class VettedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return vetted.metadata  # FileSystemReader's own would unpickle .metadata unrestricted

    region = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=into.shape)
    planner = _region_planner_class()(key, stored, region)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        load({key: into}, storage_reader=VettedReader(str(iter_dir)), planner=planner, no_dist=True)


@functools.cache
def _region_planner_class() -> type:
    """The planner class, defined on first use (its base class is torch.distributed.checkpoint's)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class _RegionPlanner(DefaultLoadPlanner):
        """Reads one region of one tensor: torch's default planner reads whole tensors into offset 0 only."""

        def __init__(self, key: str, stored: Any, region: Any) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.key, self.stored, self.region = key, stored, region

        def create_local_plan(self) -> LoadPlan:
            return LoadPlan(create_read_items_for_chunk_list(self.key, self.stored, [self.region]))

        def lookup_tensor(self, index: Any) -> torch.Tensor:
            return self.state_dict[index.fqn]  # the region itself, whatever its offset in the stored tensor

    return _RegionPlanner


def verify_torch_dist(iter_dir: str | Path) -> Vetted:
    """Vet a torch_dist checkpoint directory before anything unpickles it; see the module docstring.

    Reads the metadata and the small pickled entries, and stats the shards: cheap
    next to loading the tensors, and remembered until one of the files changes.
    """
    iter_dir = Path(iter_dir).resolve()
    signature = _signature(iter_dir)
    cached = _vetted.get(iter_dir)
    if cached is not None and cached[0] == signature:
        return cached[1]
    metadata = read_metadata(iter_dir / METADATA_FILE)
    _check_shards(iter_dir, metadata)
    _check_byte_entries(iter_dir, metadata)
    common = safe_torch_load(iter_dir / COMMON_FILE, iter_dir / COMMON_FILE)
    if not isinstance(common, dict):
        raise ConfigError(f"{iter_dir / COMMON_FILE} does not hold a dict")
    vetted = Vetted(metadata, common)
    _vetted[iter_dir] = (signature, vetted)
    return vetted


def _signature(iter_dir: Path) -> tuple:
    """(name, size, mtime) of every file in ``iter_dir``: a rewrite of any of them shows."""
    try:
        entries = sorted(os.scandir(iter_dir), key=lambda entry: entry.name)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint iteration directory not found: {iter_dir}") from None
    return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file())


def _check_shards(iter_dir: Path, metadata: Any) -> None:
    """Every shard the metadata points into exists inside ``iter_dir`` and is long enough."""
    needed: dict[str, int] = {}
    where = iter_dir / METADATA_FILE
    for info in metadata.storage_data.values():
        name, offset, length = info.relative_path, info.offset, info.length
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise ConfigError(f"{where} names a shard outside its directory: {name!r}")
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            raise ConfigError(f"{where} gives {name} a bad extent ({offset!r}, {length!r})")
        needed[name] = max(needed.get(name, 0), offset + length)
    for name, size in sorted(needed.items()):
        path = iter_dir / name
        if not path.is_file():
            raise ConfigError(f"incomplete torch_dist checkpoint: missing shard {path}")
        if (have := path.stat().st_size) < size:
            raise ConfigError(f"{path} is truncated: {have} bytes, but {METADATA_FILE} needs {size}")


def _check_byte_entries(iter_dir: Path, metadata: Any) -> None:
    """Every pickled (``BYTE_IO``) entry loads with ``weights_only``: PyTorch later loads it without."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    pickled = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    entries = sorted(
        (
            (info.relative_path, info.offset, info.length, index.fqn, info.transform_descriptors)
            for index, info in metadata.storage_data.items()
            if index.fqn in pickled
        ),
        key=lambda entry: entry[:2],
    )
    for name, in_file in itertools.groupby(entries, key=lambda entry: entry[0]):
        with open(iter_dir / name, "rb") as file:
            for _, offset, length, key, transforms in in_file:
                if transforms:  # compressed or otherwise transformed: nothing here could vet it
                    raise ConfigError(f"{iter_dir / name} stores {key} through transforms {transforms!r}")
                file.seek(offset)
                payload, where = file.read(length), f"{iter_dir / name} (entry {key})"
                if not payload.startswith(_ZIP_MAGIC):  # torch.save's format; torch.load runs a bare pickle
                    raise ConfigError(f"{where} is not a torch.save archive; refusing to unpickle it")
                safe_torch_load(payload, where)
