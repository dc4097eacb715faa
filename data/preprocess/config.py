"""The YAML config of `python -m data.preprocess run` (and of each stage), validated up front.

Every section is a dataclass, read by the loader the trainer uses too
(``megatron_patches.config_io``): unknown keys and wrong types are a :class:`ConfigError` naming
the key path (``config key 'dedup.bands' expects int, got 'x'``). Relative paths are resolved
against the directory of the config file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_patches.config_io import from_dict, read_yaml, set_dotted
from megatron_patches.errors import ConfigError

from .filters import DEFAULT_RULES, check_rules
from .label import LabelConfig
from .thresholds import Thresholds, channel_thresholds


@dataclass
class CleanConfig:
    enabled: bool = True
    thresholds: dict = field(default_factory=dict)  # overrides of thresholds.Thresholds for every channel
    channels: dict = field(default_factory=dict)  # channel -> overrides on top of its defaults
    blocklists: list = field(default_factory=list)  # plain keyword files
    desensitize: bool = True  # mask PII in kept and rejected documents and malformed-line previews
    pii_types: list | None = None  # default: every type in pii.TYPES
    # rule names in the order they run (filters.DEFAULT_RULES); clean.channels.<channel>.rules: its own
    rules: list | None = None

    def __post_init__(self) -> None:
        self.resolved_thresholds()  # a typo in clean.thresholds or clean.channels fails at load
        self.resolved_rules()

    def resolved_thresholds(self) -> tuple[Thresholds, dict[str, Thresholds]]:
        """(every channel's thresholds, {channel: its own thresholds}), typed."""
        return channel_thresholds(self.thresholds, self.channels)

    def resolved_rules(self) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
        """(every channel's rule names in order, {channel: its own list}), each name a known rule."""
        default = check_rules(self.rules, "clean.rules") if self.rules is not None else DEFAULT_RULES
        own = {
            channel: check_rules(values["rules"], f"clean.channels.{channel}.rules")
            for channel, values in (self.channels or {}).items()
            if isinstance(values, dict) and "rules" in values
        }
        return default, own


@dataclass
class DedupConfig:
    engine: str | None = None  # local | spark; default: the top-level `engine`
    ngram: int = 5
    bands: int = 20
    rows: int = 5
    num_perm: int | None = None  # default bands * rows
    threshold: float = 0.8  # Jaccard similarity above which two documents are duplicates
    # channel -> its own threshold (e.g. news-like 0.7, knowledge-like 0.85); a pair across two
    # channels is a duplicate only above the stricter (higher) of the two.
    channel_thresholds: dict = field(default_factory=dict)
    # line-level dedup (dedup/lines.py): cut lines of at least line_min_chars characters that occur
    # in at least line_min_docs documents (0: off) of line_channels (empty: every channel)
    line_min_docs: int = 0
    line_min_chars: int = 20
    line_channels: list = field(default_factory=list)
    verify: str = "exact"  # exact | signature | none (none: threshold unused, LSH bands decide)
    keep: str = "quality"  # quality (then longest) | longest
    exact: bool = True  # also drop exact duplicates of the normalized text
    seed: int = 1
    spark_master: str | None = None  # default: the top-level `spark_master`
    spark_conf: dict = field(default_factory=dict)  # default: the top-level `spark_conf`

    @property
    def perms(self) -> int:
        return self.num_perm or self.bands * self.rows

    def threshold_for(self, channel: str | None) -> float:
        """The threshold of a document's channel (unlabelled documents: `threshold`)."""
        return float(self.channel_thresholds.get(channel or "unlabelled", self.threshold))


@dataclass
class TokenizerConfig:
    vocab_size: int = 32000  # rounded up to a multiple of 128
    character_coverage: float = 0.9995
    reserved_tokens: int = 1000  # unused special tokens <|reserved_N|>, for later alignment
    domain_tokens: str | None = None  # file: one token per line, never split
    forbidden_tokens: str | None = None  # file: strings no vocabulary entry may contain
    sample_mb: float = 200.0  # training text sampled from the input
    holdout_docs: int = 200  # per channel, for the compression report
    max_piece_length: int = 16
    threads: int = 0  # 0: all cores
    seed: int = 1


@dataclass
class TokenizeConfig:
    tokenizer: str | None = None  # .model file or HF directory; default: the train-tokenizer output
    batch_docs: int = 256
    append_eod: bool = True
    # input: the input order | icp: each document followed by its most similar unvisited neighbour
    # (in-context pretraining) | spread: members of a near-duplicate cluster placed far apart
    order: str = "input"
    order_block_docs: int = 100_000  # icp/spread reorder within blocks of this many documents


@dataclass
class BlendConfig:
    ratios: dict | None = None  # channel -> ratio; None: proportional to tokens


@dataclass
class QualityRule:
    """How one channel drops documents by `label.scorer`'s score (at most one of the two)."""

    min_score: float | None = None  # drop documents scored below this
    keep_fraction: float | None = None  # keep this top fraction of the channel (a score pass, then a cut)


@dataclass
class QualityConfig:
    """Dropping by quality score in the label stage (`quality.py`); off unless a rule is set."""

    min_score: float | None = None  # every channel not in `channels`
    keep_fraction: float | None = None
    channels: dict = field(default_factory=dict)  # channel -> {min_score | keep_fraction}, replaces the above

    @property
    def default_rule(self) -> QualityRule:
        return QualityRule(self.min_score, self.keep_fraction)

    def rule_for(self, channel: str) -> QualityRule:
        if channel in self.channels:
            return from_dict(QualityRule, self.channels[channel], f"quality.channels.{channel}.")
        return self.default_rule

    @property
    def enabled(self) -> bool:
        rules = [self.default_rule, *map(self.rule_for, self.channels)]
        return any(r.min_score is not None or r.keep_fraction is not None for r in rules)


@dataclass
class TrainScorerConfig:
    """fastText supervised training of `train-scorer` (`train_scorer.py`); one thread: reproducible."""

    dim: int = 64
    epoch: int = 5
    lr: float = 0.1
    word_ngrams: int = 2
    min_count: int = 1
    bucket: int = 2_000_000  # hashed word n-gram rows: the model holds bucket x dim floats
    seed: int = 1


@dataclass
class PipelineConfig:
    input: list = field(default_factory=list)
    text_field: str = "text"
    workers: int = 0  # 0: all cores
    # Plain JSONL files larger than this are read as ranges of about this size, one task each, so
    # one big file uses every core; 0: one task per file. Outputs do not depend on it.
    range_mb: float = 128.0
    shard_docs: int = 100_000
    compress_output: bool = False
    # local: every core of this machine | spark: one Spark partition per task, for every stage
    # (dedup.engine may differ); outputs are the same byte for byte.
    engine: str = "local"
    spark_master: str | None = None  # e.g. local[8]; None: whatever spark-submit configured
    spark_conf: dict = field(default_factory=dict)  # e.g. {spark.executor.memory: 8g}
    stages: list = field(default_factory=lambda: list(STAGES))
    clean: CleanConfig = field(default_factory=CleanConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    train_scorer: TrainScorerConfig = field(default_factory=TrainScorerConfig)
    # Relative paths in the file resolve against its directory; set by load_config, not by the file.
    base_dir: Path = field(default_factory=Path.cwd, metadata={"config": False})

    def path(self, value: str | None) -> Path | None:
        return None if value is None else (self.base_dir / value).resolve()


STAGES = ("clean", "label", "dedup", "train-tokenizer", "tokenize")
ORDERS = ("input", "icp", "spread")  # tokenize.order


def validate(config: PipelineConfig) -> PipelineConfig:
    d = config.dedup
    d.engine = d.engine or config.engine
    d.spark_master = d.spark_master or config.spark_master
    d.spark_conf = d.spark_conf or dict(config.spark_conf)
    for name, value, allowed in (
        ("engine", config.engine, ("local", "spark")),
        ("dedup.engine", d.engine, ("local", "spark")),
        ("dedup.verify", d.verify, ("exact", "signature", "none")),
        ("dedup.keep", d.keep, ("quality", "longest")),
    ):
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
    if d.bands < 1 or d.rows < 1 or d.ngram < 1 or d.perms < d.bands * d.rows:
        raise ConfigError(f"dedup: need bands, rows, ngram >= 1 and num_perm >= bands*rows, got {d}")
    per_channel = {f"dedup.channel_thresholds.{c}": v for c, v in d.channel_thresholds.items()}
    for key, value in {"dedup.threshold": d.threshold, **per_channel}.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
            raise ConfigError(f"{key} must be a number in (0, 1], got {value!r}")
    if d.line_min_docs < 0 or (d.line_min_docs and d.line_min_docs < 2) or d.line_min_chars < 1:
        raise ConfigError(
            f"dedup.line_min_docs must be 0 (off) or >= 2 and line_min_chars >= 1, got {d.line_min_docs} "
            f"and {d.line_min_chars}"
        )
    if config.tokenize.order not in ORDERS:
        raise ConfigError(f"tokenize.order must be one of {list(ORDERS)}, got {config.tokenize.order!r}")
    if config.tokenize.order_block_docs < 2:
        raise ConfigError(f"tokenize.order_block_docs must be >= 2, got {config.tokenize.order_block_docs}")
    if config.tokenizer.vocab_size < 256 + 128:
        raise ConfigError(
            f"tokenizer.vocab_size {config.tokenizer.vocab_size} is too small (byte fallback uses 256)"
        )
    unknown = sorted(set(config.stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
    if config.shard_docs < 1 or config.workers < 0 or config.tokenize.batch_docs < 1:
        raise ConfigError("shard_docs and tokenize.batch_docs must be >= 1 and workers >= 0")
    validate_quality(config)
    if config.range_mb < 0:
        raise ConfigError(f"range_mb must be >= 0 (0: one task per file), got {config.range_mb}")
    return config


def validate_quality(config: PipelineConfig) -> None:
    """Quality rules: one of min_score / keep_fraction per channel, a fraction in (0, 1], a scorer."""
    q = config.quality
    if not isinstance(q.channels, dict):
        raise ConfigError(f"quality.channels must map a channel to its rule, got {q.channels!r}")
    where = {"quality": q.default_rule} | {f"quality.channels.{c}": q.rule_for(c) for c in q.channels}
    for name, rule in where.items():
        if rule.min_score is not None and rule.keep_fraction is not None:
            raise ConfigError(f"{name}: set min_score or keep_fraction, not both")
        if rule.keep_fraction is not None and not 0.0 < rule.keep_fraction <= 1.0:
            raise ConfigError(f"{name}.keep_fraction must be in (0, 1], got {rule.keep_fraction}")
    if q.enabled and not config.label.scorer:
        raise ConfigError("quality drops documents by score: set label.scorer (e.g. a train-scorer model)")
    t = config.train_scorer
    if min(t.dim, t.epoch, t.word_ngrams, t.min_count, t.bucket) < 1 or t.lr <= 0:
        raise ConfigError(
            f"train_scorer: dim, epoch, word_ngrams, min_count, bucket must be >= 1, lr > 0: {t}"
        )


def load_config(path: Path | None, overrides: dict | None = None) -> PipelineConfig:
    """Read a YAML file (or nothing: all defaults) and apply `overrides` (CLI flags) on top."""
    mapping = read_yaml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        set_dotted(mapping, dotted, value)
    config = from_dict(PipelineConfig, mapping)
    config.base_dir = path.resolve().parent if path is not None else Path.cwd()
    return validate(config)
