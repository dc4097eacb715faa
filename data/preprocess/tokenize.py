"""tokenize: documents to `<channel>_text_document.{bin,idx}` plus blend.yaml, on all cores.

Each worker takes one input file (or one byte range of a large plain file), encodes documents in
batches, appends EOD, and appends the ids of each channel to its own part files, named
`<channel>.<file>-<range>`; the parent then merges the parts per channel in that order, which is
input order (see `indexed.py`), so the result does not depend on how files were split. Nothing
holds a per-document list longer than one batch.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from megatron_patches.formats.blend import TokenizerFacts
from megatron_patches.formats.indexed import DOCUMENT_SUFFIX

from .blend import write_blend
from .config import PipelineConfig
from .engines.local import Progress
from .indexed import PartWriter, merge_parts
from .jsonl import RejectWriter, parse_text_line
from .report import Stats
from .skeleton import Stage, run_stage_object
from .stage import FileTask, document_batches, file_tasks
from .tokenizer.encode import Encoder, load_encoder

_SAFE_CHANNEL = re.compile(r"[^A-Za-z0-9_.-]")
_encoders: dict[str, Encoder] = {}


@dataclass(frozen=True)
class TokenizeTask(FileTask):
    tokenizer: Path = Path()


@lru_cache(maxsize=4096)
def channel_name(channel: str | None) -> str:
    return _SAFE_CHANNEL.sub("_", channel) if channel else "unlabelled"


def _encoder(path: Path) -> Encoder:
    key = str(path)
    if key not in _encoders:
        _encoders[key] = load_encoder(path)
    return _encoders[key]


def tokenize_file(task: TokenizeTask, progress: Progress) -> Stats:
    encoder = _encoder(task.tokenizer)
    cfg = task.config
    stats = Stats()
    parts_dir = task.out / "_parts"
    parts_dir.mkdir(exist_ok=True)
    parts: dict[str, PartWriter] = {}
    rejects = RejectWriter(task.out / "rejected", task.tag)
    eod = encoder.pack([encoder.eod_id]) if cfg.tokenize.append_eod else b""
    batches = document_batches(
        task, stats, rejects, progress, size=cfg.tokenize.batch_docs, parse=parse_text_line
    )
    try:
        for batch in batches:
            by_channel: dict[str, list[bytes]] = defaultdict(list)
            for doc, packed in zip(batch, encoder.encode_packed([d.text for d in batch]), strict=True):
                by_channel[channel_name(doc.channel)].append(packed)
            for channel, docs in by_channel.items():
                if channel not in parts:
                    parts[channel] = PartWriter(parts_dir / f"{channel}.{task.tag}", encoder.dtype)
                stats[f"channel/{channel}/tokens"] += parts[channel].add(docs, eod)
                stats[f"channel/{channel}/docs_out"] += len(docs)
            stats["docs_in"] += len(batch)
            stats["docs_out"] += len(batch)
    finally:
        for part in parts.values():
            part.close()
        rejects.close()
    return stats


class TokenizeStage(Stage):
    """Per task: documents to ids in per-channel part files; global step: the parts merged per channel
    in input order, reordered (`tokenize.order`), blend.yaml written."""

    name = "tokenize"
    work = staticmethod(tokenize_file)

    def __init__(self, config: PipelineConfig, out: Path, tokenizer: Path):
        super().__init__(config, out)
        self.tokenizer = tokenizer
        # Validates the tokenizer before any work starts; a task run in this process (one worker)
        # reuses it instead of loading it again.
        self.encoder = _encoder(tokenizer)

    def make_tasks(self, inputs: list[Path], tmp: Path) -> list[FileTask]:
        make = partial(TokenizeTask, tokenizer=self.tokenizer)
        return file_tasks(inputs, tmp, self.config, self.name, make)

    def finish(self, tmp: Path, tasks: list[FileTask], result: Stats) -> tuple[Stats, dict]:
        encoder = self.encoder
        facts = TokenizerFacts(self.tokenizer, encoder.eod_id, encoder.vocab_size, encoder.dtype.name)
        documents, tokens = _merge(tmp, encoder.dtype)
        shutil.rmtree(tmp / "_parts", ignore_errors=True)
        order = _reorder(tmp, sorted(documents), self.config, encoder.dtype)
        blend = write_blend(tmp, self.out, documents, tokens, self.config.blend.ratios, facts)
        extra = {"tokenizer": encoder.name, "tokens": sum(tokens.values()), "blend": blend}
        return result, {**extra, **({"order": order} if order else {})}


def run_tokenize(
    config: PipelineConfig, inputs: list[Path], out: Path, tokenizer: Path, overwrite: bool = False
) -> dict:
    return run_stage_object(TokenizeStage(config, out, tokenizer), inputs, overwrite)


def _reorder(tmp: Path, channels: list[str], config: PipelineConfig, dtype: np.dtype) -> dict:
    """`tokenize.order` icp or spread: each channel's documents reordered (see `order.py`)."""
    kind = config.tokenize.order
    if kind == "input":
        return {}
    from .order import reorder_channel

    block, thresholds = config.tokenize.order_block_docs, config.dedup
    return {
        channel: reorder_channel(
            tmp / f"{channel}{DOCUMENT_SUFFIX}", dtype, kind, block, thresholds.threshold_for(channel)
        )
        for channel in channels
    }


def _merge(tmp: Path, dtype: np.dtype) -> tuple[dict[str, int], dict[str, int]]:
    stems: dict[str, list[Path]] = defaultdict(list)
    for path in sorted((tmp / "_parts").glob("*.bin")):
        channel = path.name.rsplit(".", 2)[0]
        stems[channel].append(path.with_suffix(""))
    documents, tokens = {}, {}
    for channel, channel_stems in sorted(stems.items()):
        documents[channel], tokens[channel] = merge_parts(
            channel_stems, tmp / f"{channel}{DOCUMENT_SUFFIX}", dtype
        )
    return documents, tokens
