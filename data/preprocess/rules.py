"""The built-in clean rules (:data:`filters.DEFAULT_RULES`), each a small filter registered with
:func:`filters.register_filter` by the name its drops are counted under (``rejected/<name>.jsonl``).

Each reads the document's :class:`filters.Sample`; the ratio and n-gram rules also judge a batch of
samples at once (``filter_batch``: one numpy pass) with the verdicts they give one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from . import repetition
from .clean import Blocklist
from .filters import KEEP, Factory, Filter, FilterContext, Sample, Verdict, register_filter
from .thresholds import Thresholds


@dataclass(frozen=True)
class TooShort:
    name: ClassVar[str] = "too_short"
    min_chars: int

    def filter(self, sample: Sample) -> Verdict:
        chars = len(sample.text)
        return (False, self.name, chars) if chars < self.min_chars else KEEP


@dataclass(frozen=True)
class TooLong:
    name: ClassVar[str] = "too_long"
    max_chars: int

    def filter(self, sample: Sample) -> Verdict:
        chars = len(sample.text)
        return (False, self.name, chars) if chars > self.max_chars else KEEP


@dataclass(frozen=True)
class _Ratio:
    """One measured ratio of :class:`TextStats` (named like the rule) against one threshold."""

    name: ClassVar[str]
    threshold: ClassVar[str]  # the Thresholds field; min_* drops below it, max_* above
    limit: float

    def filter(self, sample: Sample) -> Verdict:
        value = getattr(sample.stats, self.name)
        bad = value < self.limit if self.threshold.startswith("min_") else value > self.limit
        return (False, self.name, round(value, 4)) if bad else KEEP

    def filter_batch(self, samples: Sequence[Sample]) -> list[Verdict]:
        """`filter` of each sample, without a call per sample (six such rules judge every document)."""
        Sample.measure_all(samples)
        name, limit = self.name, self.limit
        values = [getattr(sample._stats, name) for sample in samples]
        if self.threshold.startswith("min_"):
            return [(False, name, round(value, 4)) if value < limit else KEEP for value in values]
        return [(False, name, round(value, 4)) if value > limit else KEEP for value in values]


class ZhRatio(_Ratio):
    name, threshold = "zh_ratio", "min_zh_ratio"


class EnRatio(_Ratio):
    name, threshold = "en_ratio", "min_en_ratio"


class UrlRatio(_Ratio):
    name, threshold = "url_ratio", "max_url_ratio"


class DigitRatio(_Ratio):
    name, threshold = "digit_ratio", "max_digit_ratio"


class SymbolRatio(_Ratio):
    name, threshold = "symbol_ratio", "max_symbol_ratio"


class AlphaRatio(_Ratio):
    name, threshold = "alpha_ratio", "min_alpha_ratio"


@dataclass(frozen=True)
class BlocklistHits:
    name: ClassVar[str] = "blocklist"
    blocklist: Blocklist
    max_hits: int

    def filter(self, sample: Sample) -> Verdict:
        hits = self.blocklist.hits(sample.text)
        return (False, self.name, hits) if hits > self.max_hits else KEEP


@dataclass(frozen=True)
class LineRepetition:
    """Gopher: the fraction of duplicate lines, and of the characters in them."""

    name: ClassVar[str] = "line_repetition"
    max_dup_line_ratio: float | None
    max_dup_line_char_ratio: float | None

    def filter(self, sample: Sample) -> Verdict:
        lines, chars = sample.duplicate_lines
        if _over(lines, self.max_dup_line_ratio) or _over(chars, self.max_dup_line_char_ratio):
            return False, self.name, round(max(lines, chars), 4)
        return KEEP


@dataclass(frozen=True)
class NgramRepetition:
    """Gopher: characters in the most frequent n-gram, then in any repeated n-gram, per n."""

    name: ClassVar[str] = "ngram_repetition"
    max_top_ngram: tuple[tuple[int, float], ...]  # (n, limit) by n
    max_dup_ngram: tuple[tuple[int, float], ...]

    def filter(self, sample: Sample) -> Verdict:
        return self.filter_batch([sample])[0]

    def filter_batch(self, samples: Sequence[Sample]) -> list[Verdict]:
        """Each limit in turn, counted together for the samples it may still drop."""
        grams = repetition.NgramBatch.of_texts([sample.text for sample in samples])
        verdicts: list[Verdict] = [KEEP] * len(samples)
        alive = grams.everything()
        for n, limit in self.max_top_ngram:
            counted = alive[grams.top_fraction_bound(n)[alive] > limit]  # the rest cannot be over
            if counted.size:
                dropped = self._drop(verdicts, counted, grams.top_fraction(n, counted), limit)
                alive = alive[~np.isin(alive, dropped, kind="table")]  # np.setdiff1d, without its sorts
        pending = alive
        for i, (n, limit) in enumerate(self.max_dup_ngram):
            pending = pending[~grams.never_repeats(n)[pending]]  # their value is 0
            if not pending.size:
                break
            values = grams.duplicate_fraction(n, pending)
            pending = pending[~np.isin(pending, self._drop(verdicts, pending, values, limit), kind="table")]
            # A repeated longer n-gram is made of repeated shorter ones, so coverage only falls with n:
            # a value under every later limit needs no further count.
            later = [other for _, other in self.max_dup_ngram[i + 1 :]]
            pending = pending[values[pending] > min(later)] if later else pending[:0]
        return verdicts

    def _drop(self, verdicts: list[Verdict], tested: np.ndarray, values: np.ndarray, limit: float):
        """Record a drop for the `tested` samples whose value is over `limit`; returns them."""
        over = tested[values[tested] > limit]
        for i in over.tolist():
            verdicts[i] = (False, self.name, round(float(values[i]), 4))
        return over


def _over(value: float, limit: float | None) -> bool:
    return limit is not None and value > limit


def _one_threshold(cls: type, field: str) -> Factory:
    def make(t: Thresholds, context: FilterContext) -> Filter | None:
        limit = getattr(t, field)
        return None if limit is None else cls(limit)

    return make


for _cls, _field in (
    (TooShort, "min_chars"),
    (TooLong, "max_chars"),
    *((c, c.threshold) for c in (ZhRatio, EnRatio, UrlRatio, DigitRatio, SymbolRatio, AlphaRatio)),
):
    register_filter(_cls.name)(_one_threshold(_cls, _field))


@register_filter("blocklist")
def _blocklist(t: Thresholds, context: FilterContext) -> Filter | None:
    if context.blocklist is None or t.max_blocklist_hits is None:
        return None
    return BlocklistHits(context.blocklist, t.max_blocklist_hits)


@register_filter("line_repetition")
def _line_repetition(t: Thresholds, context: FilterContext) -> Filter | None:
    if t.max_dup_line_ratio is None and t.max_dup_line_char_ratio is None:
        return None
    return LineRepetition(t.max_dup_line_ratio, t.max_dup_line_char_ratio)


@register_filter("ngram_repetition")
def _ngram_repetition(t: Thresholds, context: FilterContext) -> Filter | None:
    if not t.max_top_ngram and not t.max_dup_ngram:
        return None
    return NgramRepetition(
        tuple(sorted((t.max_top_ngram or {}).items())), tuple(sorted((t.max_dup_ngram or {}).items()))
    )
