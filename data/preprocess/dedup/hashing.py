"""The hashing both dedup engines run: exact hashes, character shingles, MinHash, LSH band keys.

Shingles are character n-grams of the lower-cased, whitespace-collapsed text, so Chinese (no spaces)
and English are treated alike. Everything is numpy-vectorized over a document's code points:

* a shingle's hash mixes its n code points with 64-bit multiply/xor rounds (n passes over an array);
* permutation i of MinHash is ``x -> a_i * x + b_i (mod 2**32)`` with odd ``a_i``, a bijection of the
  32-bit shingle hashes; the signature is the per-permutation minimum, computed on blocks of
  shingles so the (shingles x permutations) matrix stays in cache.

Every value is a pure function of the text and the seed, so a Spark executor and a local worker
compute identical signatures.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_SPACES = re.compile(r"\s+")
_NOT_WORD = re.compile(r"[\W_]+")
_MIX = np.uint64(0x9E3779B97F4A7C15)
_FINAL = np.uint64(0xFF51AFD7ED558CCD)
_BLOCK = 256  # shingles per block: 256 x 128 permutations x 4 bytes = 128 KiB


def normalize(text: str) -> str:
    return _SPACES.sub(" ", text.lower()).strip()


def exact_hash(text: str) -> int:
    """64-bit hash of the text with case, whitespace and punctuation removed (signed, for numpy int64)."""
    key = _NOT_WORD.sub("", text.lower()).encode("utf-8", errors="surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """64-bit hashes of the character n-grams of the normalized text (one for texts shorter than n)."""
    points = np.frombuffer(normalize(text).encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    return ngram_hashes(points.astype(np.uint64), ngram)


def ngram_hashes(points: np.ndarray, ngram: int) -> np.ndarray:
    """64-bit hashes of the n-grams of a uint64 sequence (code points, or token ids for `order.py`)."""
    if points.size == 0:
        return np.zeros(0, dtype=np.uint64)
    width = min(ngram, points.size)
    count = points.size - width + 1
    with np.errstate(over="ignore"):
        h = np.zeros(count, dtype=np.uint64)
        for k in range(width):
            h ^= points[k : k + count]
            h *= _MIX
        h ^= h >> np.uint64(29)
        h *= _FINAL
        h ^= h >> np.uint64(32)
    return h


class MinHasher:
    """MinHash signatures (uint32, `num_perm` values) of character n-gram sets."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = (rng.integers(0, 2**32, num_perm, dtype=np.uint64) | np.uint64(1)).astype(np.uint32)
        self.b = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_shingles(shingle_hashes(text, self.ngram))

    def signature_of_shingles(self, shingles: np.ndarray) -> np.ndarray:
        values = shingles.astype(np.uint32)  # the low 32 bits of a well-mixed 64-bit hash
        out = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        for start in range(0, values.size, _BLOCK):
            block = values[start : start + _BLOCK, None] * self.a  # uint32 arithmetic wraps mod 2**32
            block += self.b
            np.minimum(out, block.min(axis=0), out=out)
        return out


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(docs, bands) int64 keys: band j of a signature hashed to one 64-bit value."""
    docs = signatures.shape[0]
    if signatures.shape[1] < bands * rows:
        raise ValueError(f"signature has {signatures.shape[1]} values, bands x rows needs {bands * rows}")
    grid = signatures[:, : bands * rows].reshape(docs, bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = np.full((docs, bands), np.uint64(0x243F6A8885A308D3), dtype=np.uint64)
        for r in range(rows):
            key ^= grid[:, :, r]
            key *= _MIX
            key ^= key >> np.uint64(31)
    return key.view(np.int64)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def exact_jaccard(shingles_a: np.ndarray, shingles_b: np.ndarray) -> float:
    a, b = np.unique(shingles_a), np.unique(shingles_b)
    union = np.union1d(a, b).size
    return np.intersect1d(a, b, assume_unique=True).size / union if union else 1.0
