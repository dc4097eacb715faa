"""Turning texts into ids fast: SentencePiece with a segment cache, or any HF tokenizer directory.

The segment cache is exact, not approximate. Text is cut before every run of spaces that follows a
non-space character; a model trained with `split_by_whitespace` (and whitespace kept as a prefix)
has no vocabulary piece that crosses such a point. BPE never merges across a point that no piece
crosses, so encoding the segments between the points separately gives the same ids as encoding the
whole text. Because the cut rule depends only on the two characters around a cut, one check makes
it safe for any model: at load time every vocabulary piece must come out of the cutter whole (else
the cache is off). Repeated segments (words, indentation, punctuation) then cost a dict lookup;
segments without spaces (a Chinese paragraph) go to SentencePiece as they are.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Protocol

from megatron_patches.errors import ConfigError

from .hf import NORMAL, USER_DEFINED, load_proto

# "▁" is a space to SentencePiece. A segment: optional spaces, then non-spaces; or spaces alone.
SEGMENT = re.compile(r"[ \u2581]*[^ \u2581]+|[ \u2581]+")
CACHE_MAX_SEGMENT = 32  # longer segments (long Han runs) are encoded every time, not cached
CACHE_MAX_ENTRIES = 1 << 20
SPARSE_SPACES = 50  # fewer than one space per 50 characters: no segmenting


class Encoder(Protocol):
    name: str
    vocab_size: int
    eod_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class SentencePieceEncoder:
    def __init__(self, model_path: Path, eod_id: int | None = None):
        import sentencepiece as spm

        self.name = str(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self.sp.get_piece_size()
        self.eod_id = self.sp.eos_id() if eod_id is None else eod_id
        if self.eod_id < 0:
            raise ConfigError(f"{model_path} has no end-of-sentence piece to use as EOD")
        self.cache: dict[str, list[int]] | None = {} if segment_cache_is_exact(model_path) else None
        whole = [p.piece for p in load_proto(model_path).pieces if p.type == USER_DEFINED]
        multi = [
            p.replace("\u2581", " ") for p in whole if len(SEGMENT.findall(p.replace("\u2581", " "))) != 1
        ]
        self._needs_whole = re.compile("|".join(map(re.escape, multi))) if multi else None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.cache is None:
            return self.sp.encode(list(texts), num_threads=1)
        return self._encode_cached(texts)

    def _encode_cached(self, texts: Sequence[str]) -> list[list[int]]:
        cache = self.cache
        assert cache is not None
        whole = [i for i, t in enumerate(texts) if self._whole(t)]
        skip = set(whole)
        segmented = [[] if i in skip else SEGMENT.findall(t) for i, t in enumerate(texts)]
        missing = list(set(chain.from_iterable(segmented)) - cache.keys())
        cache.update(zip(missing, self.sp.encode(missing, num_threads=1), strict=True))
        lookup = cache.__getitem__
        out = [list(chain.from_iterable(map(lookup, segments))) for segments in segmented]
        for segment in missing:
            if len(segment) > CACHE_MAX_SEGMENT:
                del cache[segment]
        if len(cache) > CACHE_MAX_ENTRIES:
            cache.clear()
        for i, ids in zip(whole, self.sp.encode([texts[i] for i in whole], num_threads=1), strict=True):
            out[i] = ids
        return out

    def _whole(self, text: str) -> bool:
        """Encode without the cache: text with a multi-segment domain token, or with almost no spaces
        (Chinese, Japanese: one long segment per paragraph, where cutting only costs time)."""
        if self._needs_whole is not None and self._needs_whole.search(text):
            return True
        return text.count(" ") * SPARSE_SPACES < len(text)


def segment_cache_is_exact(model_path: Path) -> bool:
    """True if the model normalizes only spaces and no normal piece spans a cut point."""
    proto = load_proto(model_path)
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    if spec.name != "identity" or spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        return False
    if trainer.treat_whitespace_as_suffix or proto.denormalizer_spec.precompiled_charsmap:
        return False
    for piece in proto.pieces:
        if piece.type == NORMAL and len(SEGMENT.findall(piece.piece.replace("\u2581", " "))) != 1:
            return False
    return True


class HFEncoder:
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
        self.backend = getattr(auto, "backend_tokenizer", None)
        self.auto = auto
        if self.backend is not None:
            # Text that happens to spell "</s>" must stay text in pretraining data.
            self.backend.encode_special_tokens = True

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        return [self.auto.encode(t, add_special_tokens=False, split_special_tokens=True) for t in texts]


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
