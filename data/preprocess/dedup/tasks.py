"""Per-task dedup work that both engines run unchanged: signatures, shingles for verification, and
the final filter pass that writes kept documents and `rejected/dedup_{exact,near}.jsonl`. A task is
one input file or one byte range of one (`ranges.py`); documents keep their file's line numbers."""

from __future__ import annotations

import bisect
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
from ..ranges import WHOLE_FILE, Span
from ..report import Stats
from ..spool import LineSpool
from ..stage import FileTask, document_batches, output_writer
from .hashing import MinHasher, band_keys, exact_hash, shingle_hashes
from .lines import document_line_keys, strip_lines
from .lsh import Removal, make_gid


@dataclass(frozen=True)
class SigRecord:
    gid: int
    length: int  # characters: "keep the longest" compares these
    quality: float
    exact: int
    signature: np.ndarray  # uint32 [num_perm]
    nbytes: int = 0  # bytes of the input line, for the progress bar's MB/s
    threshold: float = 1.0  # its channel's dedup threshold
    lines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # its line hashes


def hasher_for(d: DedupConfig) -> MinHasher:
    return MinHasher(num_perm=d.perms, ngram=d.ngram, seed=d.seed)


def signature_records(
    file_index: int, path: Path, config: PipelineConfig, span: Span = WHOLE_FILE
) -> Iterator[SigRecord]:
    hasher = hasher_for(config.dedup)
    for doc, nbytes in good_documents(path, config.text_field, span):
        yield SigRecord(
            gid=make_gid(file_index, doc.line),
            length=len(doc.text),
            quality=math.nan if doc.quality is None else float(doc.quality),
            exact=exact_hash(doc.text),
            signature=hasher.signature(doc.text),
            nbytes=nbytes,
            threshold=config.dedup.threshold_for(doc.channel),
            lines=document_line_keys(doc, config.dedup),
        )


def good_documents(path: Path, text_field: str, span: Span = WHOLE_FILE) -> Iterator[tuple[Document, int]]:
    """(document, bytes of its line) for the good lines; malformed ones are counted by the filter
    pass, which reads through :func:`document_batches`."""
    for item, nbytes in read_documents(path, text_field, span=span):
        if isinstance(item, Document):
            yield item, nbytes


def record_band_keys(records: list[SigRecord], d: DedupConfig) -> np.ndarray:
    if not records:
        return np.zeros((0, d.bands), dtype=np.int64)
    return band_keys(np.stack([r.signature for r in records]), d.bands, d.rows)


def shingles_for_lines(
    file_index: int, path: Path, lines: set[int], config: PipelineConfig, span: Span = WHOLE_FILE
) -> Iterator[tuple[int, np.ndarray]]:
    """(gid, unique 64-bit shingle hashes) for the given lines within `span` of one file: exact
    verification."""
    if not lines:
        return
    for doc, _ in good_documents(path, config.text_field, span):
        if doc.line in lines:
            yield make_gid(file_index, doc.line), np.unique(shingle_hashes(doc.text, config.dedup.ngram))


Drop = tuple[Removal, str, float]  # removal, keeper's 'path:line', similarity to the keeper


@dataclass(frozen=True)
class FilterTask(FileTask):
    """A file task plus what to drop from its span (line -> Drop) and the boilerplate line hashes."""

    drop: dict[int, Drop] = field(default_factory=dict)
    boilerplate: frozenset[int] = frozenset()


def filter_tasks(
    tasks: list[FileTask], drops: dict[int, dict[int, Drop]], boilerplate: frozenset[int] = frozenset()
) -> list[FilterTask]:
    """One filter task per task, each carrying only the drops of its own lines."""
    lines = {index: sorted(file_drops) for index, file_drops in drops.items()}
    out = []
    for t in tasks:
        wanted = lines_in_span(lines[t.index], t.span)
        own = {line: drops[t.index][line] for line in wanted}
        out.append(FilterTask(t.index, t.path, t.out, t.config, t.span, own, boilerplate))
    return out


def lines_in_span(sorted_lines: list[int], span: Span) -> list[int]:
    """The lines of `sorted_lines` that `span` holds."""
    low = bisect.bisect_left(sorted_lines, span.first_line)
    high = len(sorted_lines) if span.end_line is None else bisect.bisect_left(sorted_lines, span.end_line)
    return sorted_lines[low:high]


def filter_file(task: FilterTask, progress: Progress) -> Stats:
    stats = Stats()
    cfg = task.config
    writer = output_writer(task)
    rejects = RejectWriter(task.out / "rejected", task.tag)
    try:
        for batch in document_batches(task, stats, rejects, progress):
            for doc in batch:
                drop = task.drop.get(doc.line)
                if drop is None and _cut_boilerplate(doc, task, stats, rejects):
                    continue  # nothing but boilerplate: dropped as dedup_lines
                _emit(doc, drop, stats, writer, rejects, cfg.text_field)
    finally:
        writer.close()
        rejects.close()
    return stats


def _cut_boilerplate(doc: Document, task: FilterTask, stats: Stats, rejects: RejectWriter) -> bool:
    """Cut boilerplate lines out of a kept document, recording them in rejected/dedup_lines.jsonl;
    True when nothing else is left, and the document itself is dropped."""
    original = doc.text
    cut = strip_lines(doc, task.config.dedup, task.boilerplate)
    if not cut:
        return False
    channel = doc.channel or "unlabelled"
    emptied = not doc.text.strip()
    stats["lines_cut/dedup_lines"] += len(cut)
    stats[f"channel/{channel}/lines_cut/dedup_lines"] += len(cut)
    record = {"rule": "dedup_lines", "value": len(cut), "lines": cut, "id": doc.id, "channel": channel}
    if emptied:
        doc.text = original
        stats["docs_in"] += 1
        stats[f"channel/{channel}/docs_in"] += 1
        stats["rejected/dedup_lines"] += 1
        stats[f"channel/{channel}/rejected/dedup_lines"] += 1
        record = {**record, **doc.to_record(task.config.text_field)}
    rejects.write("dedup_lines", json.dumps(record, ensure_ascii=False))
    return emptied


def _emit(
    doc: Document,
    drop: Drop | None,
    stats: Stats,
    writer: ShardWriter | LineSpool,
    rejects: RejectWriter,
    text_field: str,
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
