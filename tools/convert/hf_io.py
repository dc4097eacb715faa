"""HF checkpoint directories: lazy tensor reading, streaming sharded writing, side files.

Reading maps each tensor of a ``.safetensors`` file on its own and hands out
zero-copy views, so a tensor costs memory only while it is being converted:
its mapping goes when its last view is freed. Every header is checked against the
file size up front, so a truncated download fails before anything is written.
Writing streams each tensor to its place in a shard whose header was planned
ahead, so an exported model is never held in memory whole.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.safe_load import safe_torch_load
from tools.convert.background import BackgroundWriter

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_TAGS = {dtype: tag for tag, dtype in SAFETENSORS_DTYPES.items()}
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend",)  # transformers 5 only; 4.x raises on it
GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from None


class SafetensorsFile:
    """One memory-mapped ``.safetensors`` file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            raw_len = handle.read(8)
            header_len = struct.unpack("<Q", raw_len)[0] if len(raw_len) == 8 else size
            if 8 + header_len > size:
                raise ConfigError(f"{self.path} is truncated: its {size} bytes do not hold the header")
            try:
                header = json.loads(handle.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConfigError(f"{self.path} is not a safetensors file (unreadable header)") from None
        header.pop("__metadata__", None)
        self._start = 8 + header_len
        try:
            self._entries = {name: self._parse(name, spec, size) for name, spec in header.items()}
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{self.path} has a malformed safetensors header ({err!r})") from None

    def _parse(self, name: str, spec: dict, size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if spec.get("dtype") not in SAFETENSORS_DTYPES:
            raise ConfigError(f"{self.path}: tensor {name} has unsupported dtype {spec.get('dtype')!r}")
        dtype, shape = SAFETENSORS_DTYPES[spec["dtype"]], tuple(spec["shape"])
        begin, end = (self._start + offset for offset in spec["data_offsets"])
        if end > size:
            raise ConfigError(
                f"{self.path} is truncated: tensor {name} ends at byte {end} but the file has {size}"
            )
        if end - begin != torch.Size(shape).numel() * dtype.itemsize:
            raise ConfigError(
                f"{self.path}: tensor {name} has {end - begin} bytes, not what shape {list(shape)} needs"
            )
        return dtype, shape, begin, end

    def names(self) -> list[str]:
        return list(self._entries)

    def meta(self, name: str) -> torch.Tensor:
        dtype, shape, _, _ = self._entries[name]
        return torch.empty(shape, dtype=dtype, device="meta")

    def tensor(self, name: str) -> torch.Tensor:
        """A read-only, zero-copy view over a mapping of this tensor alone, unmapped with its last view.

        Unmapping page ranges of one whole-file mapping instead (``MADV_DONTNEED``) must wait until
        no thread reads them any more, or they fault back in and stay: a reader that runs ahead of
        its writer could not say when that is."""
        dtype, shape, begin, end = self._entries[name]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        skip = begin % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page
        with open(self.path, "rb") as handle:
            pages = mmap.mmap(
                handle.fileno(), skip + end - begin, offset=begin - skip, access=mmap.ACCESS_READ
            )
        pages.madvise(mmap.MADV_WILLNEED)  # cold cache: read it in one go, not fault by fault
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(pages, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=skip)
        return flat.view(shape)

    def release(self) -> None:
        """Nothing to drop: each tensor's mapping goes with its last view."""


class TorchBinFile:
    """One ``pytorch_model*.bin`` (zip format), memory-mapped by ``torch.load``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tensors = safe_torch_load(self.path, self.path, mmap=True)

    def names(self) -> list[str]:
        return list(self._tensors)

    def meta(self, name: str) -> torch.Tensor:
        return torch.empty_like(self._tensors[name], device="meta")

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def release(self) -> None:
        pass


class HFCheckpoint:
    """An HF model directory: ``config.json`` plus safetensors (or zip ``.bin``) weights, maybe sharded."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConfigError(f"HF checkpoint directory not found: {self.dir}")
        self.config = read_json(self.dir / "config.json", "config.json")
        weight_map = self._weight_map()
        files = {}
        for file_name in dict.fromkeys(weight_map.values()):
            opener = SafetensorsFile if file_name.endswith(".safetensors") else TorchBinFile
            files[file_name] = opener(self.dir / file_name)
        self._where = {}
        for name, file_name in weight_map.items():
            if name not in files[file_name].names():
                raise ConfigError(f"{file_name} lacks tensor {name}, which its index lists")
            self._where[name] = files[file_name]
        self._files = list(files.values())

    def _weight_map(self) -> dict[str, str]:
        for index_name, single in _LAYOUTS:
            if (self.dir / index_name).exists():
                weight_map = read_json(self.dir / index_name, index_name).get("weight_map", {})
                for name, file_name in weight_map.items():
                    if not (self.dir / file_name).is_file():
                        raise ConfigError(
                            f"missing shard {self.dir / file_name} (holds {name}, per {index_name})"
                        )
                return weight_map
            if (self.dir / single).exists():
                opener = SafetensorsFile if single.endswith(".safetensors") else TorchBinFile
                return dict.fromkeys(opener(self.dir / single).names(), single)
        raise ConfigError(
            f"{self.dir} has no model.safetensors[.index.json] or pytorch_model.bin[.index.json]"
        )

    def names(self) -> list[str]:
        return list(self._where)

    def _file(self, name: str):
        if name not in self._where:
            raise ConfigError(f"HF checkpoint {self.dir} lacks tensor {name}")
        return self._where[name]

    def meta(self, name: str) -> torch.Tensor:
        return self._file(name).meta(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self._file(name).tensor(name)

    def release(self) -> None:
        for handle in self._files:
            handle.release()


def _header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    header, offset = {}, 0
    for name, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {
            "dtype": _DTYPE_TAGS[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _joined_shape(pieces: list[torch.Tensor]) -> tuple[int, ...]:
    """The shape of ``pieces`` stacked along their first dimension (one piece: its own shape)."""
    if len(pieces) == 1:
        return tuple(pieces[0].shape)
    if any(p.dim() == 0 or p.shape[1:] != pieces[0].shape[1:] for p in pieces):
        return (-1,)  # no such tensor: the caller reports what it got
    return (sum(p.shape[0] for p in pieces), *pieces[0].shape[1:])


def shard_plan(plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[list]:
    """Consecutive tensors grouped into shards of at most ``max_shard_bytes`` (a bigger one gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        nbytes = torch.Size(item[2]).numel() * item[1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


class ShardedSafetensorsWriter:
    """Writes planned tensors, in plan order, into HF-style shards plus ``model.safetensors.index.json``.

    File writes run on a :class:`~tools.convert.background.BackgroundWriter` thread, so the
    caller makes the next tensor meanwhile; ``defer`` runs a source's release once they are done.
    """

    def __init__(
        self, directory: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
    ):
        self.dir = Path(directory)
        self._shards = shard_plan(plan, max_shard_bytes)
        count = len(self._shards)
        self._file_names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
        )
        self._queue = [(k, item) for k, shard in enumerate(self._shards) for item in shard]
        self._position = 0
        self._handle = None
        self.total_bytes = sum(torch.Size(s).numel() * d.itemsize for _, d, s in plan)
        self._background = BackgroundWriter()

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, *failure: object) -> None:
        if failure[0] is not None:
            self._background.abort()  # the caller's temporary directory is removed with the partial shard

    def defer(self, function: Callable[[], None]) -> None:
        """Run ``function`` once every tensor given so far is written (see ``BackgroundWriter.defer``)."""
        self._background.defer(function)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_pieces(name, [tensor])

    def write_pieces(self, name: str, pieces: list[torch.Tensor]) -> None:
        """One planned tensor given as row blocks (one tensor: itself) whose bytes, in order, are its bytes.

        A contiguous piece (a view of a mapped input file) goes to the file as it is: no copy here."""
        shard, (want_name, dtype, shape) = self._queue[self._position]
        got = _joined_shape(pieces)
        if (name, *{p.dtype for p in pieces}, got) != (want_name, dtype, shape):
            raise ValueError(
                f"writer expected {want_name} {dtype} {list(shape)}, "
                f"got {name} {[p.dtype for p in pieces]} {list(got)}"
            )
        data = [piece.contiguous().reshape(-1).view(torch.uint8).numpy().data for piece in pieces]
        self._position += 1
        last = self._position == len(self._queue) or self._queue[self._position][0] != shard
        self._background.submit(lambda: self._write(shard, data, last))

    def _write(self, shard: int, data: list[memoryview], last: bool) -> None:
        """On the writer thread: one tensor's bytes (a shard opens at its first, closes after its last)."""
        if self._handle is None:
            self._handle = open(self.dir / self._file_names[shard], "wb")  # noqa: SIM115 - stays open across write() calls
            self._handle.write(_header_bytes(self._shards[shard]))
        for piece in data:
            self._handle.write(piece)
        if last:
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        self._background.drain()
        if self._position != len(self._queue):
            raise ValueError(f"writer closed after {self._position} of {len(self._queue)} tensors")
        if len(self._file_names) > 1:
            weight_map = {name: self._file_names[k] for k, (name, _, _) in self._queue}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_portable(directory: Path, config: dict) -> None:
    """Make an export's tokenizer and generation files read the same in transformers 4.4x-4.5x and 5.x.

    transformers 5 saves any tokenizers-backed tokenizer as ``TokenizersBackend``, a class 4.x refuses;
    ``PreTrainedTokenizerFast`` names the same class in both. An export without ``generation_config.json``
    (a trainer checkpoint has none) gets one with the config's special ids, as ``save_pretrained`` writes.
    """
    tokenizer_config = Path(directory) / "tokenizer_config.json"
    if tokenizer_config.is_file():
        values = read_json(tokenizer_config, "tokenizer_config.json")
        if values.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES:
            values["tokenizer_class"] = "PreTrainedTokenizerFast"
            tokenizer_config.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")
    generation_config = Path(directory) / "generation_config.json"
    if not generation_config.exists():
        ids = {key: config[key] for key in GENERATION_IDS if config.get(key) is not None}
        generation_config.write_text(json.dumps(ids, indent=2, sort_keys=True) + "\n")
