"""drop-used: a `tokenize` output without the documents a previous run read `--max-uses` times or more.

The trainer writes, in every checkpoint, how often each document of each prefix was read
(`megatron_patches.formats.usage`). Those counts index the documents of the very `.bin/.idx` the
run read, so the next blend is built from that tokenized output directly: per channel, the
documents used fewer than K times are copied, in order, into a new `<channel>_text_document`,
and blend.yaml is written with the source's weights (or the config's `blend.ratios`). Nothing is
re-tokenized, and a usage directory from another tokenize output (other document counts) is
refused in one line. Dropping rather than down-weighting: Megatron-Core weighs prefixes, not
documents, so a per-document weight would mean duplicating data; a channel read too often is
down-weighted through its blend ratio instead (the trainer's plan prints its epochs).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from megatron_patches.errors import ConfigError
from megatron_patches.formats.blend import BLEND_FILE, TokenizerFacts, load_blend
from megatron_patches.formats.indexed import DOCUMENT_SUFFIX, check_prefix, document_lengths
from megatron_patches.formats.usage import ChannelUsage, read_usage

from .blend import write_blend
from .config import PipelineConfig
from .indexed import merge_indexed
from .report import Stats, write_report
from .stage import is_complete, staged_dir

NAME = "drop-used"


def run_drop_used(
    config: PipelineConfig,
    tokenized: Path,
    usage_dir: Path,
    max_uses: int,
    out: Path,
    overwrite: bool = False,
) -> dict:
    """Write into `out` the tokenize output `tokenized` less the documents used `max_uses` times or more."""
    started = time.time()
    if isinstance(max_uses, bool) or not isinstance(max_uses, int) or max_uses < 1:
        raise ConfigError(f"{NAME}: --max-uses must be an integer >= 1, got {max_uses!r}")
    if not is_complete(tokenized) or not (tokenized / BLEND_FILE).is_file():
        raise ConfigError(
            f"{NAME}: {tokenized} is not a complete tokenize output (no report.json or blend.yaml)"
        )
    blend = load_blend(tokenized / BLEND_FILE)
    usage = read_usage(usage_dir)
    facts = TokenizerFacts(Path(blend["tokenizer"]), blend["eod_id"], blend["vocab_size"], blend["dtype"])
    stats = Stats()
    with staged_dir(out, overwrite) as tmp:
        documents, tokens = {}, {}
        for channel, prefix in sorted(blend["channels"].items()):
            counts = _counts_for(channel, prefix, usage)
            kept = _copy_kept(prefix, counts < max_uses, tmp / f"{channel}{DOCUMENT_SUFFIX}", stats, channel)
            if kept[0]:
                documents[channel], tokens[channel] = kept
        if not documents:
            raise ConfigError(f"{NAME}: every document was used {max_uses} times or more; raise --max-uses")
        ratios = config.blend.ratios or blend.get("weights") or None
        ratios = {c: r for c, r in ratios.items() if c in documents} if ratios else None
        result = write_blend(tmp, out, documents, tokens, ratios, facts)
        extra = {
            "tokens": sum(tokens.values()),
            "blend": result,
            "usage": str(usage_dir),
            "max_uses": max_uses,
        }
        return write_report(tmp, NAME, stats, started, inputs=[str(tokenized)], **extra)


def _counts_for(channel: str, prefix: str, usage: dict[str, ChannelUsage]) -> np.ndarray:
    """The channel's uses per document: matched by prefix path, else by channel name; none read: zeros."""
    check_prefix(prefix)
    documents = len(document_lengths(prefix)[1])
    resolved = str(Path(prefix).resolve())
    matches = [u for u in usage.values() if u.prefix == resolved] or [
        u for u in usage.values() if u.name == channel
    ]
    if not matches:
        return np.zeros(documents, dtype=np.int64)
    counts = matches[0].counts
    if len(counts) != documents:
        raise ConfigError(
            f"{NAME}: the usage counts of channel {channel} cover {len(counts)} documents but {prefix} holds "
            f"{documents}: they were counted on another tokenize output"
        )
    return counts


def _copy_kept(
    prefix: str, keep: np.ndarray, out_prefix: Path, stats: Stats, channel: str
) -> tuple[int, int]:
    """Copy the documents ``keep`` marks, in order, into ``out_prefix``.{bin,idx}; (documents, tokens)."""
    dtype, lengths = document_lengths(prefix)
    stats["docs_in"] += len(lengths)
    stats[f"channel/{channel}/docs_dropped"] += int((~keep).sum())
    stats[f"channel/{channel}/tokens_dropped"] += int(lengths[~keep].sum(dtype=np.int64))
    if not keep.any():
        return 0, 0
    ends = np.cumsum(lengths, dtype=np.int64) * dtype.itemsize
    starts = ends - np.asarray(lengths, dtype=np.int64) * dtype.itemsize
    kept_bin = out_prefix.with_name(out_prefix.name + ".kept")
    source = np.memmap(prefix + ".bin", dtype=np.uint8, mode="r")
    with open(kept_bin, "wb") as stream:
        for first, last in _runs(keep):  # consecutive kept documents: one copy each
            stream.write(source[starts[first] : ends[last]].tobytes())
    del source
    result = merge_indexed([(kept_bin, np.asarray(lengths)[keep])], out_prefix, dtype)
    kept_bin.unlink()
    stats["docs_out"] += result[0]
    return result


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``(first, last)`` index of every run of True in ``mask``."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1, strict=True))
