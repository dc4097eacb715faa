"""`run`: every stage in order from one config, each into its own directory under `--out`.

A stage whose directory is complete (has report.json) and was made from the same settings, inputs
and referenced files (blocklists, token lists, scorer model, tokenizer) is skipped, so an
interrupted run resumes where it stopped; if any of them changed it is redone, and so is every
stage after it. Files are compared by content when small and by size and mtime otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from megatron_patches.paths import refuse_overlap

from .config import PipelineConfig
from .dedup import run_dedup
from .engines import engine_session
from .jsonl import expand_inputs
from .label_stage import run_label
from .report import write_json_atomic
from .stage import is_complete, run_file_stage
from .steps import clean_file
from .tokenize import run_tokenize
from .tokenizer.train import run_train_tokenizer

STAGE_DIRS = {
    "clean": "clean",
    "label": "label",
    "dedup": "dedup",
    "train-tokenizer": "tokenizer",
    "tokenize": "tokenized",
}
# The config sections each stage's output depends on.
_SECTIONS = {
    "clean": ("text_field", "clean", "label", "shard_docs", "compress_output"),
    "label": ("text_field", "label", "quality", "shard_docs", "compress_output"),
    "dedup": ("text_field", "dedup", "shard_docs", "compress_output"),
    "train-tokenizer": ("text_field", "tokenizer"),
    "tokenize": ("text_field", "tokenize", "blend"),
}


HASHED_BYTES = 1 << 20  # files up to this size are fingerprinted by content, larger by size+mtime


def file_state(path: Path) -> list:
    """What identifies the content of `path` cheaply; a directory is the states of its files."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [[str(p.relative_to(path)), *file_state(p)] for p in files]
    if not path.exists():
        return ["missing"]
    stat = path.stat()
    if stat.st_size <= HASHED_BYTES:
        return [stat.st_size, hashlib.sha256(path.read_bytes()).hexdigest()]
    return [stat.st_size, stat.st_mtime_ns]


def tokenizer_for(config: PipelineConfig, run_dir: Path) -> Path:
    """The configured tokenizer, or the one the train-tokenizer stage writes under `run_dir`."""
    return config.path(config.tokenize.tokenizer) or run_dir / STAGE_DIRS["train-tokenizer"]


def configured_files(config: PipelineConfig, stage: str) -> dict[str, list[Path]]:
    """Files besides its inputs that a stage reads and the config names, by config key."""
    scorer = config.label.scorer or {}
    names = {
        "clean": {"clean.blocklists": list(config.clean.blocklists)},
        # a python scorer's path is a module, not a file
        "label": {"label.scorer.path": [scorer.get("path")] if scorer.get("kind") != "python" else []},
        "train-tokenizer": {
            "tokenizer.domain_tokens": [config.tokenizer.domain_tokens],
            "tokenizer.forbidden_tokens": [config.tokenizer.forbidden_tokens],
        },
        "tokenize": {"tokenize.tokenizer": [config.tokenize.tokenizer]},
    }.get(stage, {})
    return {key: [p for p in map(config.path, values) if p is not None] for key, values in names.items()}


def referenced_files(config: PipelineConfig, stage: str, run_dir: Path) -> list[Path]:
    """Files besides its inputs that a stage's output depends on."""
    if stage == "tokenize":
        return [tokenizer_for(config, run_dir)]
    return [path for paths in configured_files(config, stage).values() for path in paths]


def fingerprint(config: PipelineConfig, stage: str, inputs: list[Path], references: list[Path]) -> str:
    values = {key: getattr(config, key) for key in _SECTIONS[stage]}
    values = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in values.items()}
    files = [[str(p), *file_state(p)] for p in [*inputs, *references]]
    payload = json.dumps([stage, values, files], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _recorded(directory: Path) -> str | None:
    path = directory / "fingerprint.json"
    return json.loads(path.read_text())["fingerprint"] if path.is_file() else None


def stage_outputs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith("part-") and ".jsonl" in p.name)


def run_stage(name: str, config: PipelineConfig, inputs: list[Path], out: Path, overwrite: bool) -> dict:
    if name == "clean":
        return run_file_stage(name, config, inputs, out, overwrite, clean_file)
    if name == "label":
        return run_label(config, inputs, out, overwrite)
    if name == "dedup":
        return run_dedup(config, inputs, out, overwrite)
    if name == "train-tokenizer":
        return run_train_tokenizer(config, inputs, out, overwrite)
    return run_tokenize(config, inputs, out, tokenizer_for(config, out.parent), overwrite)


def refuse_overwriting_inputs(config: PipelineConfig, inputs: list[Path], out: Path) -> None:
    """No stage directory that `run` (re)writes under `out` may be, contain or lie in a file it reads."""
    outputs = {f"the {name} stage's output": out / STAGE_DIRS[name] for name in config.stages}
    named = {key: paths for stage in config.stages for key, paths in configured_files(config, stage).items()}
    refuse_overlap(outputs, {"listed in `input`": inputs, **named})


def run_pipeline(config: PipelineConfig, out: Path, overwrite: bool = False) -> dict[str, dict]:
    inputs = expand_inputs(config.input, config.base_dir)
    refuse_overwriting_inputs(config, inputs, out)
    out.mkdir(parents=True, exist_ok=True)
    with engine_session(config):
        return _run_stages(config, inputs, out, overwrite)


def _run_stages(config: PipelineConfig, inputs: list[Path], out: Path, overwrite: bool) -> dict[str, dict]:
    """Each stage in order, skipping those whose output is complete and up to date."""
    reports: dict[str, dict] = {}
    redo = overwrite
    documents = inputs  # what the next document stage reads
    for name in STAGE_DIRS:
        if name not in config.stages:
            continue
        stage_dir = out / STAGE_DIRS[name]
        stage_inputs = documents
        mark = fingerprint(config, name, stage_inputs, referenced_files(config, name, out))
        if not redo and is_complete(stage_dir) and _recorded(stage_dir) == mark:
            print(f"[{name}] complete in {stage_dir}, skipped", file=sys.stderr)
            reports[name] = json.loads((stage_dir / "report.json").read_text())
        else:
            redo = True  # everything after a stage that ran must run again
            reports[name] = run_stage(name, config, stage_inputs, stage_dir, overwrite=True)
            write_json_atomic(stage_dir / "fingerprint.json", {"fingerprint": mark})
        if name in ("clean", "label", "dedup"):
            documents = stage_outputs(stage_dir)
    return reports
