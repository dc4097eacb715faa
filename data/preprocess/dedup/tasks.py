"""Per-file dedup work that both engines run unchanged: signatures, shingles for verification, and the
final filter pass that writes kept documents and `rejected/dedup_{exact,near}.jsonl`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DedupConfig, PipelineConfig
from ..document import Document
from ..engines.local import Progress
from ..jsonl import RejectWriter, ShardWriter, read_documents
from ..report import Stats
from ..stage import FileTask, document_batches
from .hashing import MinHasher, band_keys, exact_hash, shingle_hashes
from .lsh import Removal, make_gid


@dataclass(frozen=True)
class SigRecord:
    gid: int
    length: int  # characters: "keep the longest" compares these
    quality: float
    exact: int
    signature: np.ndarray  # uint32 [num_perm]
    nbytes: int = 0  # bytes of the input line, for the progress bar's MB/s


def hasher_for(d: DedupConfig) -> MinHasher:
    return MinHasher(num_perm=d.perms, ngram=d.ngram, seed=d.seed)


def signature_records(file_index: int, path: Path, config: PipelineConfig) -> Iterator[SigRecord]:
    hasher = hasher_for(config.dedup)
    for doc, nbytes in good_documents(path, config.text_field):
        yield SigRecord(
            gid=make_gid(file_index, doc.line),
            length=len(doc.text),
            quality=math.nan if doc.quality is None else float(doc.quality),
            exact=exact_hash(doc.text),
            signature=hasher.signature(doc.text),
            nbytes=nbytes,
        )


def good_documents(path: Path, text_field: str) -> Iterator[tuple[Document, int]]:
    """(document, bytes of its line) for the good lines; malformed ones are counted by the filter
    pass, which reads through :func:`document_batches`."""
    for item, nbytes in read_documents(path, text_field):
        if isinstance(item, Document):
            yield item, nbytes


def record_band_keys(records: list[SigRecord], d: DedupConfig) -> np.ndarray:
    if not records:
        return np.zeros((0, d.bands), dtype=np.int64)
    return band_keys(np.stack([r.signature for r in records]), d.bands, d.rows)


def shingles_for_lines(
    file_index: int, path: Path, lines: set[int], config: PipelineConfig
) -> Iterator[tuple[int, np.ndarray]]:
    """(gid, unique 64-bit shingle hashes) for the given lines of one file: exact verification."""
    for doc, _ in good_documents(path, config.text_field):
        if doc.line in lines:
            yield make_gid(file_index, doc.line), np.unique(shingle_hashes(doc.text, config.dedup.ngram))


@dataclass(frozen=True)
class FilterTask(FileTask):
    """A file task plus what to drop from it: line -> (removal, keeper's 'path:line', similarity)."""

    drop: dict[int, tuple[Removal, str, float]] = field(default_factory=dict)


def filter_file(task: FilterTask, progress: Progress) -> Stats:
    stats = Stats()
    cfg = task.config
    writer = ShardWriter(task.out, f"part-{task.index:05d}", cfg.shard_docs, cfg.compress_output)
    rejects = RejectWriter(task.out / "rejected", task.index)
    try:
        for batch in document_batches(task, stats, rejects, progress):
            for doc in batch:
                _emit(doc, task.drop.get(doc.line), stats, writer, rejects, cfg.text_field)
    finally:
        writer.close()
        rejects.close()
    return stats


def _emit(
    doc: Document, drop, stats: Stats, writer: ShardWriter, rejects: RejectWriter, text_field: str
) -> None:
    channel = doc.channel or "unlabelled"
    stats["docs_in"] += 1
    stats[f"channel/{channel}/docs_in"] += 1
    if drop is None:
        stats["docs_out"] += 1
        stats["bytes_out"] += doc.nbytes
        stats[f"channel/{channel}/docs_out"] += 1
        writer.write(doc.to_json(text_field))
        return
    removal, keeper, similarity = drop
    stats[f"rejected/{removal.rule}"] += 1
    stats[f"channel/{channel}/rejected/{removal.rule}"] += 1
    record = {
        "rule": removal.rule,
        "value": round(similarity, 4),
        "duplicate_of": keeper,
        **doc.to_record(text_field),
    }
    rejects.write(removal.rule, json.dumps(record, ensure_ascii=False))
