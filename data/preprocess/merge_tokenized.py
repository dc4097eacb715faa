"""merge-tokenized: several `tokenize` outputs (one per shard, e.g. one per Ray task or Slurm array
job) into one, byte for byte what `tokenize` writes for all the shards' files in that order.

Per channel, the shards' `.bin` files are concatenated and their `.idx` lengths streamed into
`indexed.merge_indexed` (the same writer `tokenize` merges its parts with); `rejected/<rule>.jsonl`
are concatenated in the same order; `blend.yaml` is written from the summed counts and the config's
`blend.ratios`, as `tokenize` writes it. Shards made with different tokenizers, dtypes or a
reordering `tokenize.order` (whose order is global, not per shard) are refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from megatron_patches.errors import ConfigError
from megatron_patches.formats.blend import BLEND_FILE, TokenizerFacts, load_blend
from megatron_patches.formats.indexed import DOCUMENT_SUFFIX, check_prefix, document_lengths

from .blend import write_blend
from .config import PipelineConfig
from .indexed import merge_indexed
from .report import Stats, write_report
from .stage import is_complete, staged_dir

NAME = "merge-tokenized"
_NOT_STATS = {"stage", "inputs", "tokenizer", "tokens", "blend", "order", "seconds", "docs_per_s", "mb_per_s"}
_SAME = ("eod_id", "vocab_size", "dtype")  # besides the tokenizer's files


def run_merge_tokenized(
    config: PipelineConfig, inputs: list[Path], out: Path, overwrite: bool = False
) -> dict:
    """Merge the `tokenize` outputs `inputs` (in order) into `out`; returns the report."""
    started = time.time()
    if not inputs:
        raise ConfigError(f"{NAME}: give --inputs, the tokenize output directories in order")
    shards = [_read_shard(directory) for directory in inputs]
    facts = _same_tokenizer(inputs, [blend for blend, _ in shards])
    stats = Stats()
    for _, report in shards:
        stats.update(_stats_of(report))
    with staged_dir(out, overwrite) as tmp:
        documents, tokens = _merge_channels(tmp, [blend for blend, _ in shards], facts)
        _merge_rejects(inputs, tmp / "rejected")
        blend = write_blend(tmp, out, documents, tokens, config.blend.ratios, facts)
        extra = {"tokenizer": shards[0][1].get("tokenizer"), "tokens": sum(tokens.values()), "blend": blend}
        return write_report(tmp, NAME, stats, started, inputs=[str(p) for p in inputs], **extra)


def _read_shard(directory: Path) -> tuple[dict, dict]:
    """(blend.yaml resolved, report.json) of one complete tokenize output."""
    if not is_complete(directory) or not (directory / BLEND_FILE).is_file():
        raise ConfigError(
            f"{NAME}: {directory} is not a complete tokenize output (no report.json or blend.yaml)"
        )
    report = json.loads((directory / "report.json").read_text(encoding="utf-8"))
    if report.get("stage") not in ("tokenize", NAME):
        raise ConfigError(f"{NAME}: {directory} holds the output of {report.get('stage')!r}, not of tokenize")
    if report.get("order"):
        raise ConfigError(
            f"{NAME}: {directory} was reordered (tokenize.order {sorted(report['order'])[0]}...): that order "
            "spans all documents, so shards cannot be merged; tokenize the shards with order: input"
        )
    return load_blend(directory / BLEND_FILE), report


def _same_tokenizer(inputs: list[Path], blends: list[dict]) -> TokenizerFacts:
    """The one tokenizer every shard used (same files, EOD, vocabulary, dtype), else a one-line refusal."""
    first = blends[0]
    digest = _tokenizer_digest(Path(first["tokenizer"]))
    for directory, blend in zip(inputs[1:], blends[1:], strict=True):
        for key in _SAME:
            if blend[key] != first[key]:
                raise ConfigError(
                    f"{NAME}: {directory} has {key} {blend[key]}, {inputs[0]} has {first[key]}: "
                    "shards must be tokenized with one tokenizer"
                )
        if blend["tokenizer"] != first["tokenizer"] and _tokenizer_digest(Path(blend["tokenizer"])) != digest:
            raise ConfigError(
                f"{NAME}: {directory} was tokenized with {blend['tokenizer']}, {inputs[0]} with "
                f"{first['tokenizer']} (different files): shards must be tokenized with one tokenizer"
            )
    return TokenizerFacts(Path(first["tokenizer"]), first["eod_id"], first["vocab_size"], first["dtype"])


def _tokenizer_digest(path: Path) -> str:
    """SHA-256 over a tokenizer's files (a .model file, or every file of its directory)."""
    if not path.exists():
        raise ConfigError(f"{NAME}: the tokenizer {path} named in a shard's blend.yaml does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else "").encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _merge_channels(tmp: Path, blends: list[dict], facts: TokenizerFacts) -> tuple[dict, dict]:
    """Every channel of any shard: its shards' `.bin/.idx`, in shard order, into one prefix."""
    channels = sorted({channel for blend in blends for channel in blend["channels"]})
    documents, tokens = {}, {}
    for channel in channels:
        parts = []
        for blend in blends:
            if channel in blend["channels"]:
                prefix = blend["channels"][channel]
                check_prefix(prefix)
                dtype, lengths = document_lengths(prefix)
                if dtype.name != facts.dtype:
                    raise ConfigError(
                        f"{NAME}: {prefix}.idx holds {dtype.name} ids, its blend.yaml says {facts.dtype}"
                    )
                parts.append((Path(prefix + ".bin"), lengths))
        prefix = tmp / f"{channel}{DOCUMENT_SUFFIX}"
        documents[channel], tokens[channel] = merge_indexed(parts, prefix, np.dtype(facts.dtype))
    return documents, tokens


def _merge_rejects(inputs: list[Path], out: Path) -> None:
    """`rejected/<rule>.jsonl` of every shard, concatenated in shard order."""
    rules = sorted({p.name for directory in inputs for p in (directory / "rejected").glob("*.jsonl")})
    if rules:
        out.mkdir()
    for rule in rules:
        with open(out / rule, "wb") as merged:
            for directory in inputs:
                if (directory / "rejected" / rule).is_file():
                    with open(directory / "rejected" / rule, "rb") as src:
                        while chunk := src.read(1 << 24):
                            merged.write(chunk)


def _stats_of(report: dict[str, Any], section: str = "") -> Stats:
    """The flat counters a report.json was written from (`Stats.nested` undone)."""
    stats = Stats()
    for key, value in report.items():
        if not section and key in _NOT_STATS:
            continue
        if isinstance(value, dict):
            stats.update(_stats_of(value, f"{section}{key}/"))
        elif isinstance(value, int | float):
            stats[f"{section}{key}"] += value
    return stats
