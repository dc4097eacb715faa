"""The clean rules as small composable filters (datatrove-style), and the per-channel chain of them.

A filter has a ``name`` (its rule: ``rejected/<name>.jsonl``, report ``rejected/<name>``) and
``filter(sample) -> Verdict``: :data:`KEEP`, or ``(False, rule, value)`` with the measured value that
made it drop the document. Its thresholds are typed fields. A channel's chain runs its filters in
the configured order (``clean.rules``, or ``clean.channels.<channel>.rules``) and records the first
that drops; :data:`DEFAULT_RULES` is the order the clean stage has always used (cheap rules first).

Every filter of one document reads the same :class:`Sample`, whose measures (character classes,
lines) are computed once, on first use, so no rule re-scans the text another has. The clean stage
runs a chain on a batch of documents (:meth:`FilterChain.verdicts`), so a rule with ``filter_batch``
measures all of them in one numpy pass (character classes, word n-grams) for the same verdicts.

A new rule is a factory ``(thresholds, FilterContext) -> Filter | None`` (None: off for that
channel) registered with :func:`register_filter`; a module outside this one that registers rules is
listed in :data:`PLUGIN_MODULES` and imported when rule names are first resolved.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from megatron_patches.errors import ConfigError

from . import repetition
from .clean import Blocklist, TextStats, measure, measure_many, text_stats
from .document import Document
from .label import LabelConfig, classes_and_languages, infer_channel, infer_channels
from .thresholds import Thresholds

Verdict = tuple[bool, str | None, Any]  # (keep, rule, measured value)
KEEP: Verdict = (True, None, None)


class Sample:
    """One document as the filters see it; each measure is computed on first use, then shared.
    (Plain attributes, not functools.cached_property, whose per-access lock costs on every rule.)"""

    __slots__ = ("doc", "text", "_stats", "_classes", "_duplicate_lines")

    def __init__(self, doc: Document, classes: list[int] | None = None):
        """`classes`: the text's clean.char_classes where the caller counted them already."""
        self.doc = doc
        self.text = doc.text
        self._stats: TextStats | None = None
        self._classes = classes
        self._duplicate_lines: tuple[float, float] | None = None

    @property
    def stats(self) -> TextStats:
        if self._stats is None:
            classes = self._classes
            self._stats = measure(self.text) if classes is None else text_stats(self.text, classes)
        return self._stats

    @staticmethod
    def measure_all(samples: Sequence[Sample]) -> None:
        """Compute :attr:`stats` of the samples that have none yet, all together (one numpy pass)."""
        missing = [sample for sample in samples if sample._stats is None and sample._classes is None]
        for sample in samples:
            if sample._stats is None and sample._classes is not None:
                sample._stats = text_stats(sample.text, sample._classes)
        if not missing:  # the usual case after the first ratio rule
            return
        for sample, stats in zip(missing, measure_many([sample.text for sample in missing]), strict=True):
            sample._stats = stats

    @property
    def duplicate_lines(self) -> tuple[float, float]:
        if self._duplicate_lines is None:
            self._duplicate_lines = repetition.duplicate_line_fractions(self.text)
        return self._duplicate_lines


class Filter(Protocol):
    """A rule may also define ``filter_batch(samples) -> list[Verdict]`` (the same verdicts, computed
    for many samples at once), which :meth:`FilterChain.verdicts` then calls."""

    name: ClassVar[str]

    def filter(self, sample: Sample) -> Verdict: ...


@dataclass(frozen=True)
class FilterContext:
    """What a factory may need besides the channel's thresholds."""

    channel: str
    blocklist: Blocklist | None = None
    config: Any = None  # the PipelineConfig (plug-ins read their own section)


Factory = Callable[[Thresholds, FilterContext], "Filter | None"]
FILTERS: dict[str, Factory] = {}
PLUGIN_MODULES: tuple[str, ...] = ()  # dotted names of modules that register more rules
DEFAULT_RULES = (
    "too_short",
    "too_long",
    "zh_ratio",
    "en_ratio",
    "url_ratio",
    "digit_ratio",
    "symbol_ratio",
    "alpha_ratio",
    "blocklist",
    "line_repetition",
    "ngram_repetition",
)


def register_filter(name: str) -> Callable[[Factory], Factory]:
    def register(factory: Factory) -> Factory:
        FILTERS[name] = factory
        return factory

    return register


def known_rules() -> list[str]:
    for module in PLUGIN_MODULES:
        importlib.import_module(module)
    return sorted(FILTERS)


def check_rules(rules: Any, where: str) -> tuple[str, ...]:
    """``rules`` as a tuple of known, distinct rule names; anything else is a one-line ConfigError."""
    if not isinstance(rules, list | tuple) or not all(isinstance(r, str) for r in rules):
        raise ConfigError(f"{where} must be a list of rule names, got {rules!r}")
    known = known_rules()
    unknown = [r for r in rules if r not in known]
    if unknown:
        raise ConfigError(f"{where}: unknown rule(s) {unknown}; known: {known}")
    repeated = sorted({r for r in rules if rules.count(r) > 1})
    if repeated:
        raise ConfigError(f"{where}: rule(s) {repeated} listed more than once")
    return tuple(rules)


@dataclass(frozen=True)
class FilterChain:
    """A channel's filters in order; the first that drops a document decides its verdict."""

    filters: tuple[Filter, ...]

    def __call__(self, sample: Sample) -> Verdict:
        for rule in self.filters:
            verdict = rule.filter(sample)
            if not verdict[0]:
                return verdict
        return KEEP

    def verdicts(self, samples: Sequence[Sample]) -> list[Verdict]:
        """The verdict of each sample, as ``self(sample)`` gives it: each rule sees, all at once, the
        samples that no earlier rule dropped (one `filter_batch` call where the rule has one)."""
        verdicts = [KEEP] * len(samples)
        alive = list(range(len(samples)))
        for rule in self.filters:
            batch = getattr(rule, "filter_batch", None)
            tested = [samples[i] for i in alive]
            results = batch(tested) if batch is not None else [rule.filter(s) for s in tested]
            for i, verdict in zip(alive, results, strict=True):
                verdicts[i] = verdict
            alive = [i for i, verdict in zip(alive, results, strict=True) if verdict[0]]
        return verdicts


def build_chain(rules: Sequence[str], thresholds: Thresholds, context: FilterContext) -> FilterChain:
    known_rules()  # plug-in modules registered
    made = (FILTERS[name](thresholds, context) for name in rules)
    return FilterChain(tuple(f for f in made if f is not None))


def check(text: str, thresholds: Thresholds, blocklist: Blocklist | None = None) -> Verdict:
    """The default rules' verdict on `text` under `thresholds`."""
    chain = build_chain(DEFAULT_RULES, thresholds, FilterContext("", blocklist))
    return chain(Sample(Document(text=text, id="")))


class Cleaner:
    """The clean step's rules: the chain of the document's channel (built once per channel)."""

    def __init__(
        self,
        default: Thresholds,
        channels: dict[str, Thresholds],
        blocklist: Blocklist | None,
        label_config: LabelConfig,
        rules: tuple[tuple[str, ...], dict[str, tuple[str, ...]]] = (DEFAULT_RULES, {}),
        config: Any = None,
    ):
        self.default, self.channels, self.blocklist = default, channels, blocklist
        self.label_config, self.rules, self.config = label_config, rules, config
        self.chains: dict[str, FilterChain] = {}

    def channel_of(self, doc: Document) -> str:
        return infer_channel(doc, self.label_config)

    def channels_of(self, docs: Sequence[Document]) -> list[str]:
        return infer_channels(docs, self.label_config)

    def chain(self, channel: str) -> FilterChain:
        if channel not in self.chains:
            default_rules, channel_rules = self.rules
            context = FilterContext(channel, self.blocklist, self.config)
            thresholds = self.channels.get(channel, self.default)
            self.chains[channel] = build_chain(channel_rules.get(channel, default_rules), thresholds, context)
        return self.chains[channel]

    def __call__(self, doc: Document, channel: str) -> Verdict:
        return self.chain(channel)(Sample(doc))

    def judge(self, docs: Sequence[Document]) -> tuple[list[str], list[Verdict]]:
        """(channels_of(docs), their verdicts) with one count of character classes, which both the
        language of a prose document and the ratio rules read."""
        classes, langs = classes_and_languages([doc.text for doc in docs])
        channels = infer_channels(docs, self.label_config, langs)
        return channels, self.verdicts(docs, channels, classes.tolist())

    def verdicts(
        self, docs: Sequence[Document], channels: Sequence[str], classes: Sequence[list[int]] | None = None
    ) -> list[Verdict]:
        """``self(doc, channel)`` of every document, each channel's documents through its chain at once
        (`classes`: their clean.char_classes, where counted already)."""
        by_channel: dict[str, list[int]] = {}
        for i, channel in enumerate(channels):
            by_channel.setdefault(channel, []).append(i)
        verdicts: list[Verdict] = [KEEP] * len(docs)
        for channel, members in by_channel.items():
            samples = [Sample(docs[i], None if classes is None else classes[i]) for i in members]
            results = self.chain(channel).verdicts(samples)
            for i, verdict in zip(members, results, strict=True):
                verdicts[i] = verdict
        return verdicts


# ---- the built-in rules -------------------------------------------------------------------------


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
