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

from .label import LabelConfig


@dataclass
class CleanConfig:
    enabled: bool = True
    thresholds: dict = field(default_factory=dict)  # overrides of clean.Thresholds for every channel
    channels: dict = field(default_factory=dict)  # channel -> overrides on top of its defaults
    blocklists: list = field(default_factory=list)  # plain keyword files
    desensitize: bool = True  # mask PII in kept and rejected documents and malformed-line previews
    pii_types: list | None = None  # default: every type in pii.TYPES


@dataclass
class DedupConfig:
    engine: str = "local"  # local | spark
    ngram: int = 5
    bands: int = 20
    rows: int = 5
    num_perm: int | None = None  # default bands * rows
    threshold: float = 0.8  # Jaccard similarity above which two documents are duplicates
    verify: str = "exact"  # exact | signature | none (none: threshold unused, LSH bands decide)
    keep: str = "quality"  # quality (then longest) | longest
    exact: bool = True  # also drop exact duplicates of the normalized text
    seed: int = 1
    spark_master: str | None = None  # e.g. local[2]; None: whatever spark-submit configured
    spark_conf: dict = field(default_factory=dict)

    @property
    def perms(self) -> int:
        return self.num_perm or self.bands * self.rows


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


@dataclass
class BlendConfig:
    ratios: dict | None = None  # channel -> ratio; None: proportional to tokens


@dataclass
class PipelineConfig:
    input: list = field(default_factory=list)
    text_field: str = "text"
    workers: int = 0  # 0: all cores
    shard_docs: int = 100_000
    compress_output: bool = False
    stages: list = field(default_factory=lambda: list(STAGES))
    clean: CleanConfig = field(default_factory=CleanConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    # Relative paths in the file resolve against its directory; set by load_config, not by the file.
    base_dir: Path = field(default_factory=Path.cwd, metadata={"config": False})

    def path(self, value: str | None) -> Path | None:
        return None if value is None else (self.base_dir / value).resolve()


STAGES = ("clean", "label", "dedup", "train-tokenizer", "tokenize")


def validate(config: PipelineConfig) -> PipelineConfig:
    d = config.dedup
    for name, value, allowed in (
        ("dedup.engine", d.engine, ("local", "spark")),
        ("dedup.verify", d.verify, ("exact", "signature", "none")),
        ("dedup.keep", d.keep, ("quality", "longest")),
    ):
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
    if d.bands < 1 or d.rows < 1 or d.ngram < 1 or d.perms < d.bands * d.rows:
        raise ConfigError(f"dedup: need bands, rows, ngram >= 1 and num_perm >= bands*rows, got {d}")
    if not 0.0 < d.threshold <= 1.0:
        raise ConfigError(f"dedup.threshold must be in (0, 1], got {d.threshold}")
    if config.tokenizer.vocab_size < 256 + 128:
        raise ConfigError(
            f"tokenizer.vocab_size {config.tokenizer.vocab_size} is too small (byte fallback uses 256)"
        )
    unknown = sorted(set(config.stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
    if config.shard_docs < 1 or config.workers < 0 or config.tokenize.batch_docs < 1:
        raise ConfigError("shard_docs and tokenize.batch_docs must be >= 1 and workers >= 0")
    return config


def load_config(path: Path | None, overrides: dict | None = None) -> PipelineConfig:
    """Read a YAML file (or nothing: all defaults) and apply `overrides` (CLI flags) on top."""
    mapping = read_yaml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        set_dotted(mapping, dotted, value)
    config = from_dict(PipelineConfig, mapping)
    config.base_dir = path.resolve().parent if path is not None else Path.cwd()
    return validate(config)
