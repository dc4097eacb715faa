"""Gopher-style repetition measures (Rae et al. 2021, table A1), made to work for Chinese too.

"Words" are Latin/digit runs and single CJK characters, so a Chinese sentence repeated ten times
scores like an English one. N-grams are hashed with numpy (one rolling pass per n) instead of
building Python tuples, which keeps the clean stage fast. All functions are pure and return
fractions in [0, 1].
"""

from __future__ import annotations

import re

import numpy as np

_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")
_MIX = np.uint64(0x9E3779B97F4A7C15)


# ASCII text: every character that is not a letter or digit becomes a space, then str.split (the
# same words as _WORD, which on ASCII is [a-z0-9]+ after lower(), several times faster).
_ASCII_SEPARATORS = {c: " " for c in range(128) if not chr(c).isalnum()}


def words(text: str) -> list[str]:
    lower = text.lower()
    if lower.isascii():
        return lower.translate(_ASCII_SEPARATORS).split()
    return _WORD.findall(lower)


def duplicate_line_fractions(text: str) -> tuple[float, float]:
    """(fraction of non-empty lines that repeat an earlier line, fraction of characters in them)."""
    lines = [line for line in map(str.strip, text.split("\n")) if line]
    if not lines:
        return 0.0, 0.0
    unique = set(lines)
    if len(unique) == len(lines):
        return 0.0, 0.0
    seen: set[str] = set()
    dup_lines = dup_chars = 0
    for line in lines:
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        else:
            seen.add(line)
    return dup_lines / len(lines), dup_chars / max(1, sum(map(len, lines)))


class Ngrams:
    """The words of one text as hashes and lengths, from which n-gram statistics are computed."""

    def __init__(self, tokens: list[str]):
        self.size = len(tokens)
        self.hashes = np.fromiter(map(hash, tokens), dtype=np.int64, count=self.size).view(np.uint64)
        self.lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=self.size)
        self.total_chars = int(self.lengths.sum())
        self.max_count: dict[int, int] = {}  # n -> occurrences of the most frequent n-gram, once sorted
        self.repeated: dict[int, np.ndarray] = {}  # n -> whether the n-gram at each position repeats
        self._cumulative: np.ndarray | None = None

    def _grams(self, n: int) -> np.ndarray:
        count = self.size - n + 1
        h = self.hashes[:count] * _MIX  # uint64 arrays wrap around silently
        for k in range(1, n):
            h = (h ^ self.hashes[k : k + count]) * _MIX
        return h

    def top_fraction(self, n: int) -> float:
        """Characters covered by the most frequent n-gram (all its occurrences) over all characters.
        Among equally frequent n-grams the one with the most characters counts, so that the value
        does not depend on the order of the word hashes (Python's str hash differs per process)."""
        if self.size < n:
            return 0.0
        grams = self._grams(n)
        order = np.argsort(grams)  # equal n-grams have equal characters: their order does not matter
        ordered = grams[order]
        boundary = np.empty(ordered.size, dtype=bool)
        boundary[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=boundary[1:])
        starts = np.flatnonzero(boundary)
        if starts.size == ordered.size:
            self.max_count[n] = 1
            return 0.0
        counts = np.empty_like(starts)  # occurrences of each distinct n-gram
        np.subtract(starts[1:], starts[:-1], out=counts[:-1])
        counts[-1] = ordered.size - starts[-1]
        top = int(counts.max())
        self.max_count[n] = top
        alone = boundary & np.append(boundary[1:], True)  # an n-gram that occurs once, in sorted order
        self.repeated[n] = np.empty(ordered.size, dtype=bool)
        self.repeated[n][order] = ~alone
        chars = int(self._spans(n)[order[starts[counts == top]]].max())
        return min(1.0, top * chars / max(1, self.total_chars))

    def top_fraction_bound(self, n: int) -> float:
        """At least :meth:`top_fraction` of `n`, from what is known without sorting: the most frequent
        n-gram occurs at most as often as the most frequent shorter one, and spans at most the
        longest n-gram's characters. Lets a filter skip the sort when the bound is under its limit."""
        if self.size < n:
            return 0.0
        count = min((c for m, c in self.max_count.items() if m <= n), default=None)
        if count is None:
            return 1.0  # nothing counted yet
        return min(1.0, count * int(self._spans(n).max()) / max(1, self.total_chars))

    def _spans(self, n: int) -> np.ndarray:
        """Characters of the n-gram at each position."""
        if self._cumulative is None:
            self._cumulative = np.concatenate(([0], np.cumsum(self.lengths)))
        return self._cumulative[n:] - self._cumulative[:-n]

    def _repeated_windows(self, n: int) -> int:
        """How many n-grams could repeat, by the longest shorter m-gram counted: in a repeated n-gram
        every m-gram is repeated. (An upper bound: the n-gram count when nothing is known yet.)"""
        known = [m for m in self.repeated if m < n]
        if not known:
            return self.size - n + 1
        m = max(known)
        count = self.size - n + 1
        windows = self.repeated[m][:count].copy()
        for k in range(1, n - m + 1):
            windows &= self.repeated[m][k : k + count]
        return int(np.count_nonzero(windows))

    def duplicate_fraction(self, n: int) -> float:
        """Characters of words inside an n-gram that occurs more than once, over all characters."""
        if self.size < n or any(c <= 1 for m, c in self.max_count.items() if m <= n):
            return 0.0  # no shorter n-gram repeats, so no n-gram does
        if self._repeated_windows(n) < 2:
            return 0.0
        grams = self._grams(n)
        order = np.argsort(grams)  # which equal n-gram comes first does not matter here
        ordered = grams[order]
        same = ordered[1:] == ordered[:-1]
        if not same.any():
            return 0.0
        repeated = np.zeros(grams.size, dtype=bool)
        repeated[order[1:][same]] = True
        repeated[order[:-1][same]] = True
        covered = np.convolve(repeated.astype(np.int32), np.ones(n, dtype=np.int32))[: self.size] > 0
        return int(self.lengths[covered].sum()) / max(1, self.total_chars)


def top_ngram_fraction(tokens: list[str], n: int) -> float:
    return Ngrams(tokens).top_fraction(n)


def duplicate_ngram_fraction(tokens: list[str], n: int) -> float:
    return Ngrams(tokens).duplicate_fraction(n)
