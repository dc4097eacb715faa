"""Turning texts into token ids fast: SentencePiece with an exact segment cache
(`segment_cache.py`), or any HF tokenizer directory.

Ids come out *packed*: the bytes of a document's ids in the dataset's dtype, which is what `.bin`
holds, so the hot loop never builds a Python int per token (`encode_batch` unpacks, for callers
that want lists).
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Protocol

import numpy as np

from megatron_patches.errors import ConfigError
from megatron_patches.formats.indexed import token_dtype

from .hf import load_proto
from .segment_cache import SegmentCache, exactness

_TYPECODES = {np.dtype(np.uint16): "H", np.dtype(np.int32): "i"}  # array typecodes, native order
BUFFER_CHARS = 256  # texts this long on average come from SentencePiece as buffers, not lists


class Encoder(Protocol):
    name: str
    vocab_size: int
    eod_id: int
    dtype: np.dtype

    def encode_packed(self, texts: Sequence[str]) -> list[bytes]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class _Packing:
    """What both encoders share: ids <-> packed bytes in `dtype`."""

    dtype: np.dtype

    def encode_packed(self, texts: Sequence[str]) -> list[bytes]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [np.frombuffer(blob, self.dtype).tolist() for blob in self.encode_packed(texts)]

    def pack(self, ids: Sequence[int]) -> bytes:
        return array(_TYPECODES[self.dtype], ids).tobytes()


class SentencePieceEncoder(_Packing):
    def __init__(self, model_path: Path, eod_id: int | None = None):
        import sentencepiece as spm

        self.name = str(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self.sp.get_piece_size()
        self.dtype = token_dtype(self.vocab_size)
        self.eod_id = self.sp.eos_id() if eod_id is None else eod_id
        if self.eod_id < 0:
            raise ConfigError(f"{model_path} has no end-of-sentence piece to use as EOD")
        # sentencepiece >= 0.2.1 hands ids over as int32 buffers: no Python int per token.
        self._buffers = hasattr(self.sp, "EncodeAsNumpy")
        proto = load_proto(model_path)
        self.cache: SegmentCache | None = None
        exact = exactness(proto)
        if exact is not None:
            self.cache = SegmentCache(self._encode_packed, exact.domain_tokens, exact.ascii_cuts)

    def encode_packed(self, texts: Sequence[str]) -> list[bytes]:
        if self.cache is not None:
            return self.cache.encode_packed(texts)
        return self._encode_packed(list(texts))

    def _encode_packed(self, texts: list[str]) -> list[bytes]:
        """SentencePiece's ids for each text, packed, in one C++ call. Long texts' ids come as int32
        buffers, converted once per batch: no Python int per token. A buffer costs about a microsecond
        more per text than a list, so short texts (cache misses, mostly one word) come as lists."""
        if not texts:
            return []
        if not self._buffers or sum(map(len, texts)) < BUFFER_CHARS * len(texts):
            return [self.pack(ids) for ids in self.sp.encode(texts, num_threads=1)]
        arrays = self.sp.encode(texts, num_threads=1, out_type="numpy")
        data = np.concatenate(arrays).astype(self.dtype, copy=False).tobytes()
        ends = np.cumsum(np.fromiter(map(len, arrays), np.int64, len(arrays))) * self.dtype.itemsize
        return [data[start:end] for start, end in pairwise([0, *ends.tolist()])]


class HFEncoder(_Packing):
    """Any HF tokenizer directory, through its Rust `tokenizers` backend (no transformers overhead)."""

    def __init__(self, directory: Path):
        from transformers import AutoTokenizer

        self.name = str(directory)
        try:
            auto = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load a HF tokenizer from {directory}: {err}") from err
        if auto.eos_token_id is None:
            raise ConfigError(f"{directory} defines no eos_token to use as EOD")
        self.eod_id = int(auto.eos_token_id)
        self.vocab_size = len(auto)
        self.dtype = token_dtype(self.vocab_size)
        self.backend = getattr(auto, "backend_tokenizer", None)
        self.auto = auto
        if self.backend is not None:
            # Text that happens to spell "</s>" must stay text in pretraining data.
            self.backend.encode_special_tokens = True

    def encode_packed(self, texts: Sequence[str]) -> list[bytes]:
        if self.backend is not None:
            encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
            return [self.pack(e.ids) for e in encodings]
        return [
            self.pack(self.auto.encode(t, add_special_tokens=False, split_special_tokens=True)) for t in texts
        ]


def load_encoder(path: Path) -> Encoder:
    """A .model file or a directory: ours (tokenizer_info.json + tokenizer.model) or any HF one."""
    if path.is_file() and path.suffix == ".model":
        return SentencePieceEncoder(path)
    if path.is_dir():
        info_path = path / "tokenizer_info.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text(encoding="utf-8"))
            return SentencePieceEncoder(path / info["sentencepiece_model"], eod_id=int(info["eod_id"]))
        os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core per worker process
        return HFEncoder(path)
    raise ConfigError(f"tokenizer {path} is neither a SentencePiece .model file nor a directory")
