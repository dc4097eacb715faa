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


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


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

    def _grams(self, n: int) -> np.ndarray:
        count = self.size - n + 1
        with np.errstate(over="ignore"):
            h = np.zeros(count, dtype=np.uint64)
            for k in range(n):
                h = (h ^ self.hashes[k : k + count]) * _MIX
        return h

    def top_fraction(self, n: int) -> float:
        """Characters covered by the most frequent n-gram (all its occurrences) over all characters.
        Among equally frequent n-grams the one with the most characters counts, so that the value
        does not depend on the order of the word hashes (Python's str hash differs per process)."""
        if self.size < n:
            return 0.0
        grams = self._grams(n)
        order = np.argsort(grams, kind="stable")
        ordered = grams[order]
        boundary = np.empty(ordered.size, dtype=bool)
        boundary[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=boundary[1:])
        starts = np.flatnonzero(boundary)
        counts = np.diff(np.append(starts, ordered.size))
        if counts.max() <= 1:
            return 0.0
        cumulative = np.concatenate(([0], np.cumsum(self.lengths)))
        chars = (cumulative[n:] - cumulative[:-n])[order[starts]]  # of each n-gram's first occurrence
        best = int(np.lexsort((chars, counts))[-1])
        return min(1.0, int(counts[best]) * int(chars[best]) / max(1, self.total_chars))

    def duplicate_fraction(self, n: int) -> float:
        """Characters of words inside an n-gram that occurs more than once, over all characters."""
        if self.size < n:
            return 0.0
        grams = self._grams(n)
        order = np.argsort(grams, kind="stable")
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
