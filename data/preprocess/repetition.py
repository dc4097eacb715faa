"""Gopher-style repetition measures (Rae et al. 2021, table A1), made to work for Chinese too.

"Words" are Latin/digit runs and single CJK characters, so a Chinese sentence repeated ten times
scores like an English one. N-grams are hashed with numpy (one rolling pass per n) instead of
building Python tuples, and for many texts at once (:class:`NgramBatch`), which keeps the clean
stage fast. All functions are pure and return fractions in [0, 1].
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np

from . import word_hashes

# The CJK characters are word_hashes.CJK_RANGES.
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")
_MIX = np.uint64(0x9E3779B97F4A7C15)
_SALT = np.uint64(0xD6E8FEB86659FD93)


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


class NgramBatch:
    """The words of several texts as hashes and lengths, from which each text's n-gram statistics are
    computed together: one numpy pass per n over all of them, since numpy's fixed cost per call,
    paid per text, was most of the clean stage's time (it checks hundreds of documents per MB).
    Methods take the texts to compute for (indices) and return one value per text of the batch;
    values of texts not asked for are meaningless."""

    def __init__(self, hashes: np.ndarray, lengths: np.ndarray, sizes: np.ndarray):
        """`hashes` and `lengths` of the words of every text in order, `sizes` words per text."""
        self.texts = sizes.size
        self.hashes, self.lengths, self.sizes = hashes, lengths, sizes
        self.text_of = np.repeat(np.arange(self.texts), self.sizes)  # the text of each word
        self.cumulative = np.concatenate(([0], np.cumsum(self.lengths)))
        ends = np.cumsum(self.sizes)
        self.total_chars = self.cumulative[ends] - self.cumulative[ends - self.sizes]
        # n -> per text, occurrences of its most frequent n-gram once counted (inf: not counted yet)
        self.max_count: dict[int, np.ndarray] = {}
        # n -> per word, False where the n-gram starting there was counted and occurs once
        self.may_repeat: dict[int, np.ndarray] = {}
        self._longest_grams = (1, self.hashes * _MIX)  # (n, hash of each n-gram): see _gram_hashes
        self._salts: np.ndarray | None = None

    @classmethod
    def of_texts(cls, texts: Sequence[str]) -> NgramBatch:
        """The batch of the :func:`words` of `texts`, split and hashed with numpy."""
        return cls(*word_hashes.word_hashes(texts))

    @classmethod
    def of_words(cls, word_lists: Sequence[list[str]]) -> NgramBatch:
        """The batch of given word lists (hashed with Python's `hash`)."""
        sizes = np.fromiter(map(len, word_lists), dtype=np.int64, count=len(word_lists))
        flat = list(itertools.chain.from_iterable(word_lists))
        hashes = np.fromiter(map(hash, flat), dtype=np.int64, count=len(flat)).view(np.uint64)
        return cls(hashes, np.fromiter(map(len, flat), dtype=np.int64, count=len(flat)), sizes)

    def everything(self) -> np.ndarray:
        return np.arange(self.texts)

    def _positions(self, n: int, texts: np.ndarray) -> np.ndarray:
        """Where the n-grams of `texts` start (an n-gram never spans two texts)."""
        count = self.hashes.size - n + 1
        if count <= 0:
            return np.empty(0, dtype=np.int64)
        chosen = np.zeros(self.texts, dtype=bool)
        chosen[texts] = True
        first = self.text_of[:count]
        return np.flatnonzero((first == self.text_of[n - 1 :]) & chosen[first])

    def _groups(self, n: int, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Equal n-grams of one text as groups: (positions in group order, group starts, group sizes).
        An n-gram that contains a shorter one counted once is left out: it occurs once too."""
        positions = self._positions(n, texts)
        count = self.hashes.size - n + 1
        may_repeat = self.may_repeat.setdefault(n, np.ones(self.hashes.size, dtype=bool))
        may_repeat[positions] = False  # until found in a group of two or more below
        if positions.size:
            positions = positions[self._shorter_repeat(n, count)[positions]]
        if not positions.size:
            return positions, positions, positions
        # Salted by text, so that equal n-grams of two texts stay apart (a clash is as unlikely as two
        # different n-grams of one text sharing a hash); the salt lets one unstable sort do every text.
        if self._salts is None:
            self._salts = self.text_of.astype(np.uint64) * _SALT
        keys = self._gram_hashes(n)[positions] ^ self._salts[positions]
        order = np.argsort(keys)
        ordered = keys[order]
        boundary = np.empty(ordered.size, dtype=bool)
        boundary[:1] = True
        np.not_equal(ordered[1:], ordered[:-1], out=boundary[1:])
        starts = np.flatnonzero(boundary)
        counts = np.diff(np.append(starts, ordered.size))
        members = positions[order]
        may_repeat[members[np.repeat(counts > 1, counts)]] = True
        return members, starts, counts

    def _gram_hashes(self, n: int) -> np.ndarray:
        """The hash of the n-gram at each word where one fits: the (n-1)-gram's hash mixed with the
        n-th word's (uint64 arrays wrap around silently). The rule asks for n in increasing order, so
        each n extends the last one computed instead of mixing all n words again."""
        done, grams = self._longest_grams
        if done > n:
            done, grams = 1, self.hashes * _MIX
        for k in range(done, n):
            count = self.hashes.size - k
            grams = (grams[:count] ^ self.hashes[k : k + count]) * _MIX
        self._longest_grams = (n, grams)
        return grams

    def _shorter_repeat(self, n: int, count: int) -> np.ndarray:
        """Per n-gram position, whether every m-gram inside it repeats, for each m < n counted."""
        every = np.ones(count, dtype=bool)
        for m, may_repeat in self.may_repeat.items():
            for k in range(n - m + 1) if m < n else ():
                every &= may_repeat[k : k + count]
        return every

    def _spans(self, n: int, positions: np.ndarray) -> np.ndarray:
        """Characters of the n-gram at each of `positions`."""
        return self.cumulative[positions + n] - self.cumulative[positions]

    def top_fraction(self, n: int, texts: np.ndarray) -> np.ndarray:
        """Per text: characters covered by its most frequent n-gram (all occurrences) over all its
        characters. Among equally frequent n-grams the one with the most characters counts, so that
        the value does not depend on the order of the word hashes (Python's str hash differs per process)."""
        members, starts, counts = self._groups(n, texts)
        first = members[starts]  # equal n-grams have equal characters: any occurrence will do
        owner = self.text_of[first]
        top = np.zeros(self.texts, dtype=np.int64)
        np.maximum.at(top, owner, counts)
        is_top = counts == top[owner]
        chars = np.zeros(self.texts, dtype=np.int64)
        np.maximum.at(chars, owner[is_top], self._spans(n, first[is_top]))
        known = self.max_count.setdefault(n, np.full(self.texts, np.inf))
        known[texts] = top[texts]
        fraction = np.minimum(1.0, top * chars / np.maximum(1, self.total_chars))
        return np.where(top > 1, fraction, 0.0)

    def _smallest_count(self, n: int) -> np.ndarray:
        """Per text, the fewest occurrences of the most frequent m-gram over the m <= n counted (inf:
        none counted): in a repeated n-gram every shorter m-gram repeats at least as often."""
        counts = [known for m, known in self.max_count.items() if m <= n]
        return np.minimum.reduce(counts) if counts else np.full(self.texts, np.inf)

    def top_fraction_bound(self, n: int) -> np.ndarray:
        """Per text, at least :meth:`top_fraction` of `n`, from what is known without sorting: the most
        frequent n-gram occurs at most as often as the most frequent shorter one, and spans at most the
        longest n-gram's characters. Lets a filter skip the sort where the bound is under its limit."""
        if not any(m <= n for m in self.max_count):
            return np.where(self.sizes < n, 0.0, 1.0)  # nothing counted yet
        count, longest = self._smallest_count(n), self._longest(n)
        with np.errstate(invalid="ignore"):  # inf * 0 for texts of fewer than n words
            bound = np.minimum(1.0, count * longest / np.maximum(1, self.total_chars))
        return np.where(self.sizes < n, 0.0, bound)

    def _longest(self, n: int) -> np.ndarray:
        """Per text with at least n words, the characters of its longest n-gram (else meaningless)."""
        count = self.hashes.size - n + 1
        longest = np.zeros(self.texts, dtype=np.int64)
        if count <= 0:
            return longest
        spans = self._spans(n, np.arange(count))
        spans[self.text_of[:count] != self.text_of[n - 1 :]] = 0  # across two texts
        first = np.cumsum(self.sizes) - self.sizes  # each text's first word
        inside = first < count
        longest[inside] = np.maximum.reduceat(spans, first[inside])
        return longest

    def never_repeats(self, n: int) -> np.ndarray:
        """Per text, whether a shorter n-gram count already shows that no n-gram repeats."""
        return self._smallest_count(n) <= 1

    def duplicate_fraction(self, n: int, texts: np.ndarray) -> np.ndarray:
        """Per text: characters of words inside an n-gram that occurs more than once, over all characters."""
        members, starts, counts = self._groups(n, texts)
        repeated = np.zeros(self.hashes.size, dtype=np.int32)
        repeated[members[np.repeat(counts > 1, counts)]] = 1
        # a word is covered when one of the n n-grams that hold it repeats: a window sum by cumsum
        # (np.convolve with n ones, the same sums, multiplies n times per word)
        window = np.cumsum(repeated, dtype=np.int64)
        window[n:] -= window[:-n].copy()
        covered = window > 0
        chars = np.bincount(self.text_of[covered], weights=self.lengths[covered], minlength=self.texts)
        return chars / np.maximum(1, self.total_chars)


def top_ngram_fraction(tokens: list[str], n: int) -> float:
    batch = NgramBatch.of_words([tokens])
    return float(batch.top_fraction(n, batch.everything())[0])


def duplicate_ngram_fraction(tokens: list[str], n: int) -> float:
    batch = NgramBatch.of_words([tokens])
    return float(batch.duplicate_fraction(n, batch.everything())[0])
