"""The words of many texts at once, as numpy arrays of hashes and lengths (no Python string per word).

The words are those of ``repetition.words``: after ``str.lower()``, a single CJK character (the
ranges of :data:`CJK_RANGES`) or a run of letters and digits (``[^\\W_]+``), found left to right.
Splitting with a regex and hashing each word with Python's ``hash`` cost about half of the n-gram
repetition rule; here every step is one numpy pass over the characters of a whole batch of texts.
A word's hash is a polynomial hash of its code points (mod 2**64) mixed with its length, so equal
words get equal hashes and different words, as with any 64-bit hash, almost surely do not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CJK_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF))
_ALNUM, _CJK = 1, 2  # bit flags per code point: a letter or digit ([^\W_]); in CJK_RANGES
_BASE = np.uint64(0x100000001B3)  # odd, so its powers never vanish mod 2**64
_MIX = np.uint64(0x9E3779B97F4A7C15)
_SEPARATOR = "\x00"  # between texts: neither a letter nor CJK, so no word spans two texts


def _flag_table() -> np.ndarray:
    table = np.array([_ALNUM if chr(cp).isalnum() else 0 for cp in range(0x10000)], dtype=np.uint8)
    for lo, hi in CJK_RANGES:
        table[lo : hi + 1] |= _CJK
    return table


_FLAGS = _flag_table()
_powers = np.ones(1, dtype=np.uint64)  # _BASE ** k, grown on demand and kept for the next batch


def _power_table(size: int) -> np.ndarray:
    global _powers
    if _powers.size < size:
        grown = np.full(max(size, 2 * _powers.size), _BASE, dtype=np.uint64)
        grown[0] = 1
        _powers = np.cumprod(grown)  # uint64 products wrap around silently, as meant
    return _powers


def _flags(points: np.ndarray) -> np.ndarray:
    if not points.size or points.max() <= 0xFFFF:
        return _FLAGS[points]
    flags = _FLAGS[np.minimum(points, 0xFFFF)]
    astral = np.flatnonzero(points > 0xFFFF)  # rare: letters of CJK extension B and on, emoji (not letters)
    flags[astral] = [_ALNUM if chr(cp).isalnum() else 0 for cp in points[astral].tolist()]
    return flags


def word_spans(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of each word of the lower-cased code points `points`, in order."""
    flags = _flags(points)
    # A run of letters and digits begins on a letter or digit outside CJK_RANGES and goes on through
    # every letter or digit, CJK ones included (`[^\W_]+` is greedy); a CJK character outside a run
    # is a word alone. So a block of CJK letters belongs to a run when the character before it does.
    in_run = flags == _ALNUM
    blocks = np.flatnonzero(np.diff(_padded(flags == _ALNUM | _CJK)))  # starts and ends, alternating
    first, last = blocks[0::2], blocks[1::2]
    joined = (first > 0) & in_run[np.maximum(first - 1, 0)]
    if joined.any():
        inside = np.zeros(points.size + 1, dtype=np.int8)
        inside[first[joined]] = 1
        inside[last[joined]] = -1
        in_run |= np.cumsum(inside[:-1], dtype=np.int8) > 0
    edges = np.diff(_padded(in_run))  # 1 where a run starts, -1 one past where it ends
    alone = (flags >= _CJK) & ~in_run
    starts = np.flatnonzero((edges[:-1] == 1) | alone)
    # Words do not overlap, so their ends in order pair with their starts in order.
    ends = np.flatnonzero((edges == -1) | _padded(alone)[:-1])
    return starts, ends


def _padded(mask: np.ndarray) -> np.ndarray:
    """`mask` as 0/1 bytes with a 0 before and after, so that np.diff finds every block's edges."""
    padded = np.zeros(mask.size + 2, dtype=np.int8)
    padded[1:-1] = mask
    return padded


def word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash and length of each word of every text, in order; words per text) for `texts`."""
    lowered = [text.lower() for text in texts]  # per text: lower() looks at neighbours (final sigma)
    joined = _SEPARATOR.join(lowered)
    points = np.frombuffer(joined.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    starts, ends = word_spans(points)
    powers = _power_table(points.size + 1)
    prefix = np.zeros(points.size + 1, dtype=np.uint64)
    np.cumsum(points.astype(np.uint64) * powers[: points.size], out=prefix[1:])
    # sum of c_(s+k) * BASE**(s+k), times BASE**(size-s): the same value wherever the word stands
    lengths = (ends - starts).astype(np.int64)
    hashes = (prefix[ends] - prefix[starts]) * powers[points.size - starts]
    hashes = (hashes ^ lengths.view(np.uint64)) * _MIX
    text_starts = np.cumsum([0] + [len(text) + 1 for text in lowered])  # and one past the end
    return hashes, lengths, np.diff(np.searchsorted(starts, text_starts)).astype(np.int64)
