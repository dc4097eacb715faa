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
channel) registered with :func:`register_filter`. The built-in rules live in ``rules.py``; a module
that registers more is listed in :data:`PLUGIN_MODULES`; both are imported when rule names are first
resolved.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

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
BUILT_IN_RULES = f"{__package__}.rules"  # registers DEFAULT_RULES (imported as plug-ins are)
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
    for module in (BUILT_IN_RULES, *PLUGIN_MODULES):
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
        """(the channel of each document, its verdict) with one count of character classes, which both
        the language of a prose document and the ratio rules read."""
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
