"""What every stage shares: an output directory that appears only when complete, tasks (one per
input file, or per byte range of a large plain file: see `ranges.py`), and the document loop (read,
count malformed lines, apply a step, write kept and rejected documents).

A *step* takes a batch of documents and returns, for each, ``(keep, rule, value, channel)``; it may
change the documents (masking, channel, quality) and add to the stats. Filters are steps whose
``keep`` is sometimes False; their `rule` names `rejected/<rule>.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_patches.paths import atomic_dir

from . import pii
from .config import PipelineConfig
from .document import Document, Malformed
from .engines.local import Progress
from .jsonl import Parser, RejectWriter, ShardWriter, parse_line, read_documents
from .ranges import WHOLE_FILE, Span, range_bytes, split_files
from .report import Stats
from .spool import SPOOL_DIR, LineSpool

StepResult = tuple[bool, str | None, Any, str]  # keep, rule, measured value, channel
Step = Callable[[Sequence[Document], Stats], list[StepResult]]
BATCH = 64


def cpu_workers(requested: int) -> int:
    return requested if requested > 0 else (os.cpu_count() or 1)


def is_complete(directory: Path) -> bool:
    return (directory / "report.json").is_file()


def staged_dir(out: Path, overwrite: bool) -> AbstractContextManager[Path]:
    """Yield a temporary directory that replaces `out` on success; a failure leaves `out` untouched."""
    return atomic_dir(out, overwrite, exists_hint="pass --overwrite to replace it", writers="stage runs")


@dataclass(frozen=True)
class FileTask:
    """Read `span` of input file number `index`; write into `out`. Output names follow `index`."""

    index: int
    path: Path
    out: Path
    config: PipelineConfig
    span: Span = WHOLE_FILE

    @property
    def tag(self) -> str:
        """Names this task's temporary files so that they sort in input order."""
        return f"{self.index:05d}-{self.span.part:05d}"


def file_tasks(
    inputs: list[Path], out: Path, config: PipelineConfig, desc: str, make: Callable[..., FileTask] = FileTask
) -> list[FileTask]:
    """One task per input file, or per range of a plain file larger than `config.range_mb`."""
    spans = split_files(inputs, range_bytes(config.range_mb), cpu_workers(config.workers), f"{desc}: ranges")
    return [
        make(index, path, out, config, span)
        for index, (path, file_spans) in enumerate(zip(inputs, spans, strict=True))
        for span in file_spans
    ]


def output_writer(task: FileTask) -> ShardWriter | LineSpool:
    """Where a task writes kept documents: the file's parts directly, or a spool when the file is
    split into ranges (cut into the same parts by :func:`assemble_parts` once all have run)."""
    if task.span.is_whole_file:
        cfg = task.config
        return ShardWriter(task.out, f"part-{task.index:05d}", cfg.shard_docs, cfg.compress_output)
    return LineSpool(task.out / SPOOL_DIR, task.tag)


def document_batches(
    task: FileTask,
    stats: Stats,
    rejects: RejectWriter,
    progress: Progress,
    size: int = BATCH,
    parse: Parser = parse_line,
) -> Iterator[list[Document]]:
    """Batches of good documents of one task's span; malformed lines are counted and written aside.
    Lines and bytes read are counted (stats, progress) once per batch."""
    batch: list[Document] = []
    lines = nbytes = 0
    pii_types = preview_pii_types(task.config)
    for item, item_bytes in read_documents(task.path, task.config.text_field, parse, task.span):
        lines += 1
        nbytes += item_bytes
        if isinstance(item, Malformed):
            set_aside(item, stats, rejects, pii_types)
            continue
        batch.append(item)
        if len(batch) >= size:
            stats["bytes_in"] += nbytes
            progress.update(lines, nbytes)
            lines = nbytes = 0
            yield batch
            batch = []
    stats["bytes_in"] += nbytes
    progress.update(lines, nbytes)
    if batch:
        yield batch


def set_aside(item: Malformed, stats: Stats, rejects: RejectWriter, pii_types: tuple[str, ...]) -> None:
    """Count a malformed line and write it, PII masked, to rejected/malformed.jsonl."""
    stats["malformed_lines"] += 1
    stats[f"malformed/{item.reason}"] += 1
    rejects.write("malformed", masked_preview(item, pii_types, stats).to_json())


def preview_pii_types(config: PipelineConfig) -> tuple[str, ...]:
    """What to mask in the raw preview of a malformed line: `clean`'s PII types when desensitizing
    is on (in every stage, since any stage may read raw input), but no repost-line stripping, which
    is about boilerplate and would cut a one-line preview away."""
    if not config.clean.desensitize:
        return ()
    return tuple(t for t in pii.selected_types(config.clean.pii_types) if t != "repost_line")


def masked_preview(item: Malformed, pii_types: tuple[str, ...], stats: Stats) -> Malformed:
    """`item` with PII masked in its preview, so rejected/malformed.jsonl holds none either."""
    if not pii_types or not item.raw:
        return item
    raw, counts = pii.desensitize(item.raw, pii_types)
    for kind, n in counts.items():
        stats[f"pii_in_rejected/{kind}"] += n
    return dataclasses.replace(item, raw=raw)


def map_file(task: FileTask, progress: Progress, make_step: Callable[[PipelineConfig], Step]) -> Stats:
    """Run one step over one task's documents: the body of clean and label."""
    stats = Stats()
    step = make_step(task.config)
    writer = output_writer(task)
    rejects = RejectWriter(task.out / "rejected", task.tag)
    text_field = task.config.text_field
    try:
        for batch in document_batches(task, stats, rejects, progress):
            for doc, (keep, rule, value, channel) in zip(batch, step(batch, stats), strict=True):
                stats["docs_in"] += 1
                stats[f"channel/{channel}/docs_in"] += 1
                if keep:
                    stats["docs_out"] += 1
                    stats["bytes_out"] += doc.nbytes
                    stats[f"channel/{channel}/docs_out"] += 1
                    writer.write(doc.to_json(text_field))
                else:
                    stats[f"rejected/{rule}"] += 1
                    stats[f"channel/{channel}/rejected/{rule}"] += 1
                    record = {"rule": rule, "value": value, "channel": channel, **doc.to_record(text_field)}
                    rejects.write(str(rule), json.dumps(record, ensure_ascii=False))
    finally:
        writer.close()
        rejects.close()
    return stats


def run_file_stage(
    name: str,
    config: PipelineConfig,
    inputs: list[Path],
    out: Path,
    overwrite: bool,
    task_fn: Callable[[FileTask, Progress], Stats],
    extra_report: Callable[[Path], dict] | None = None,
) -> dict:
    """A document stage (clean, label) run by the skeleton on the configured engine."""
    from .skeleton import DocumentStage, run_stage_object  # the skeleton builds on this module

    return run_stage_object(DocumentStage(name, config, out, task_fn, extra_report), inputs, overwrite)
