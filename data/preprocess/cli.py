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
    run = sub.add_parser("run", help="every stage in order, from one config (resumes complete stages)")
    _common(run, needs_input=False)
    _engine(run)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    pairs = {
        "workers": args.workers,
        "range_mb": args.range_mb,
        "text_field": args.text_field,
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
