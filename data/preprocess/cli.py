"""`python -m data.preprocess <stage> ...`: argument parsing for every stage and for `run`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_patches.errors import ConfigError
from megatron_patches.paths import refuse_overlap

from .config import PipelineConfig, load_config
from .engines import ENGINES
from .jsonl import expand_inputs, refuse_url
from .pipeline import configured_files, run_pipeline, run_stage

PROG = "python -m data.preprocess"
_HELP = {
    "clean": "quality rules with per-channel thresholds, then PII masking",
    "label": "assign channels (source rules, content heuristics) and optional quality scores",
    "dedup": "exact + MinHash-LSH near-duplicate removal (local cores or Apache Spark)",
    "dedup-plan": "documents and tokens each dedup threshold would keep, per channel (writes nothing else)",
    "train-tokenizer": "SentencePiece BPE + HF tokenizer directory",
    "tokenize": "documents to Megatron <channel>_text_document.bin/.idx + blend.yaml",
}


def _common(parser: argparse.ArgumentParser, needs_input: bool) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (defaults for every setting if omitted)")
    if needs_input:
        parser.add_argument("--input", nargs="+", help="JSONL files or globs (.jsonl, .jsonl.gz, .jsonl.zst)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--workers", type=int, help="processes (default: all cores)")
    parser.add_argument(
        "--range-mb", type=float, help="read plain JSONL larger than this as ranges, one task each (0: off)"
    )
    parser.add_argument("--text-field", help="JSON key holding the text (default: text)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def _engine(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, help="local cores or Apache Spark")
    parser.add_argument("--spark-master", help="e.g. local[2]; default: what spark-submit configured")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Raw JSONL to Megatron-Core .bin/.idx.")
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, help_text in _HELP.items():
        stage = sub.add_parser(name, help=help_text)
        _common(stage, needs_input=True)
        if name != "dedup-plan":
            _engine(stage)
        if name == "train-tokenizer":
            stage.add_argument("--vocab-size", type=int)
        if name == "tokenize":
            stage.add_argument("--tokenizer", type=Path, help=".model file or HF tokenizer directory")
        if name == "dedup-plan":
            stage.add_argument("--thresholds", required=True, help="comma-separated, e.g. 0.6,0.7,0.8,0.9")
            stage.add_argument("--tokenizer", type=Path, help="count tokens with it (default: bytes / 4)")
    merge = sub.add_parser("merge-tokenized", help="tokenize outputs of shards (in order) into one")
    merge.add_argument("--config", type=Path, help="YAML config (its blend.ratios weigh the channels)")
    merge.add_argument("--inputs", nargs="+", type=Path, required=True, help="tokenize output directories")
    merge.add_argument("--out", type=Path, required=True, help="output directory")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    scorer = sub.add_parser("train-scorer", help="fastText quality classifier from positive/negative JSONL")
    _common(scorer, needs_input=False)
    _engine(scorer)
    scorer.add_argument("--positive", nargs="+", required=True, help="JSONL files or globs of good text")
    scorer.add_argument("--negative", nargs="+", required=True, help="JSONL files or globs of bad text")
    used = sub.add_parser("drop-used", help="a tokenize output without the documents a run read too often")
    used.add_argument("--config", type=Path, help="YAML config (its blend.ratios, else the source's weights)")
    used.add_argument("--tokenized", type=Path, required=True, help="the tokenize output the run read")
    used.add_argument("--usage", type=Path, required=True, help="RUN/checkpoints/iter_N/usage (or iter_N)")
    used.add_argument("--max-uses", type=int, required=True, help="drop documents used this often or more")
    used.add_argument("--out", type=Path, required=True, help="output directory")
    used.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    run = sub.add_parser("run", help="every stage in order, from one config (resumes complete stages)")
    _common(run, needs_input=False)
    _engine(run)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    pairs = {
        "workers": getattr(args, "workers", None),
        "range_mb": getattr(args, "range_mb", None),
        "text_field": getattr(args, "text_field", None),
        # a flag overrides the config for every stage, dedup's own keys included
        "engine": getattr(args, "engine", None),
        "dedup.engine": getattr(args, "engine", None),
        "spark_master": getattr(args, "spark_master", None),
        "dedup.spark_master": getattr(args, "spark_master", None),
        "tokenizer.vocab_size": getattr(args, "vocab_size", None),
    }
    return {key: value for key, value in pairs.items() if value is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refuse_url(args.out, "--out")
    config = load_config(args.config, _overrides(args))
    if args.stage == "merge-tokenized":
        return _merge_tokenized(args, config)
    if args.stage == "train-scorer":
        return _train_scorer(args, config)
    if args.stage == "drop-used":
        return _drop_used(args, config)
    if args.stage == "run":
        if not config.input:
            raise ConfigError("run: the config needs an `input:` list of JSONL files or globs")
        reports = run_pipeline(config, args.out, overwrite=args.overwrite)
        summary = {
            name: {k: r.get(k) for k in ("docs_in", "docs_out", "seconds")} for name, r in reports.items()
        }
        print(json.dumps(summary, indent=1))
        return 0
    patterns = args.input or config.input
    if not patterns:
        raise ConfigError(f"{args.stage}: give --input or an `input:` list in the config")
    inputs = expand_inputs(patterns, None if args.input else config.base_dir)
    # A stage replaces its whole --out directory, so no file it reads may be at, in or above it.
    read = {"--input" if args.input else "listed in `input`": inputs, "--config": args.config}
    refuse_overlap({"--out": args.out}, {**read, **configured_files(config, args.stage)})
    if args.stage == "tokenize":
        tokenizer = args.tokenizer or config.path(config.tokenize.tokenizer)
        if tokenizer is None:
            raise ConfigError("tokenize: give --tokenizer (a .model file or a HF tokenizer directory)")
        refuse_overlap({"--out": args.out}, {"--tokenizer": tokenizer})
        from .tokenize import run_tokenize

        run_tokenize(config, inputs, args.out, tokenizer, overwrite=args.overwrite)
        return 0
    if args.stage == "dedup-plan":
        return _plan(args, config, inputs)
    run_stage(args.stage, config, inputs, args.out, overwrite=args.overwrite)
    return 0


def _plan(args: argparse.Namespace, config: PipelineConfig, inputs: list[Path]) -> int:
    from .dedup.plan import format_plan, plan_dedup

    try:
        thresholds = [float(value) for value in args.thresholds.split(",")]
    except ValueError as err:
        raise ConfigError(f"--thresholds expects comma-separated numbers, got {args.thresholds!r}") from err
    if args.tokenizer is not None:
        refuse_overlap({"--out": args.out}, {"--tokenizer": args.tokenizer})
    rows = plan_dedup(config, inputs, args.out, thresholds, args.tokenizer, overwrite=args.overwrite)
    print(format_plan(rows, config, args.tokenizer))
    return 0


def _merge_tokenized(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .merge_tokenized import run_merge_tokenized

    for directory in args.inputs:
        refuse_url(directory, "--inputs")
    refuse_overlap({"--out": args.out}, {"--inputs": args.inputs, "--config": args.config})
    run_merge_tokenized(config, args.inputs, args.out, overwrite=args.overwrite)
    return 0


def _train_scorer(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .train_scorer import run_train_scorer

    positive, negative = expand_inputs(args.positive), expand_inputs(args.negative)
    read = {"--positive": positive, "--negative": negative, "--config": args.config}
    refuse_overlap({"--out": args.out}, read)
    run_train_scorer(config, positive, negative, args.out, overwrite=args.overwrite)
    return 0


def _drop_used(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .drop_used import run_drop_used

    refuse_overlap({"--out": args.out}, {"--tokenized": args.tokenized, "--usage": args.usage})
    run_drop_used(config, args.tokenized, args.usage, args.max_uses, args.out, overwrite=args.overwrite)
    return 0
