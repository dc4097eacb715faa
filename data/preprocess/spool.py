"""Output parts of a file that was split into ranges: the same parts one task would have written.

A task writes its file's kept documents into `part-<file>-<n>` parts of `shard_docs` documents
each. Ranges of one file run at the same time and do not know how many documents the earlier ones
keep, so each spools its kept lines to `_spool/<file>-<range>.jsonl` (plus the end offset of every
line); once all have finished, the parts are cut from the spools in order, in parallel, one task
per part. Names, contents and document order are therefore independent of the range size.
"""

from __future__ import annotations

import gzip
import shutil
from array import array
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from megatron_patches.paths import atomic_file

from .engines.local import Progress, run_tasks
from .report import Stats

if TYPE_CHECKING:
    from .stage import FileTask

SPOOL_DIR = "_spool"
_COPY = 1 << 22


class LineSpool:
    """Writes lines to `<directory>/<tag>.jsonl` and their end offsets to `<tag>.ends` (int64)."""

    def __init__(self, directory: Path, tag: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.lines_path, self.ends_path = directory / f"{tag}.jsonl", directory / f"{tag}.ends"
        self._handle = open(self.lines_path, "wb")  # noqa: SIM115
        self._ends = array("q")
        self._offset = 0

    def write(self, line: str) -> None:
        data = line.encode("utf-8") + b"\n"
        self._handle.write(data)
        self._offset += len(data)
        self._ends.append(self._offset)

    def close(self) -> None:
        self._handle.close()
        self.ends_path.write_bytes(self._ends.tobytes())


@dataclass(frozen=True)
class Slice:
    """Lines [first, first + count) of one spool."""

    spool: Path  # the .jsonl; its offsets are beside it in .ends
    first: int
    count: int


@dataclass(frozen=True)
class PartPlan:
    final: Path
    compress: bool
    slices: tuple[Slice, ...]


def plan_parts(spools: list[Path], final_stem: Path, shard_docs: int, compress: bool) -> list[PartPlan]:
    """Cut the lines of `spools` (in order) into parts of `shard_docs`, named as ShardWriter names them."""
    bounds = [0]
    for spool in spools:
        bounds.append(bounds[-1] + _line_count(spool))
    suffix = ".jsonl.gz" if compress else ".jsonl"
    plans = []
    for number, begin in enumerate(range(0, bounds[-1], shard_docs)):
        stop = min(begin + shard_docs, bounds[-1])
        slices = tuple(
            Slice(spool, max(begin, low) - low, min(stop, high) - max(begin, low))
            for spool, low, high in zip(spools, bounds, bounds[1:], strict=False)
            if low < stop and high > begin and high > low  # a range that kept nothing adds no slice
        )
        final = final_stem.with_name(f"{final_stem.name}-{number:05d}{suffix}")
        plans.append(PartPlan(final, compress, slices))
    return plans


def _ends_path(spool: Path) -> Path:
    return spool.with_suffix(".ends")


def _line_count(spool: Path) -> int:
    return _ends_path(spool).stat().st_size // 8


def _byte_range(piece: Slice) -> tuple[int, int]:
    ends = np.fromfile(_ends_path(piece.spool), dtype=np.int64)
    start = int(ends[piece.first - 1]) if piece.first else 0
    return start, int(ends[piece.first + piece.count - 1])


def _copy_range(src: Path, start: int, end: int, dst: BinaryIO) -> None:
    with open(src, "rb") as handle:
        handle.seek(start)
        remaining = end - start
        while remaining > 0 and (chunk := handle.read(min(_COPY, remaining))):
            dst.write(chunk)
            remaining -= len(chunk)


def write_part(plan: PartPlan, progress: Progress) -> Stats:
    """Write one part from its slices, through a temporary file renamed into place (as ShardWriter does)."""
    with atomic_file(plan.final) as tmp, gzip.open(tmp, "wb") if plan.compress else open(tmp, "wb") as out:
        for piece in plan.slices:
            start, end = _byte_range(piece)
            _copy_range(piece.spool, start, end, out)
            progress.update(piece.count, end - start)
    return Stats()


def assemble_parts(tasks: list[FileTask], workers: int) -> None:
    """Cut the spools of every split file (the stage's tasks, in order) into its parts, then delete
    the spools. Files read whole wrote their parts directly and are left alone."""
    plans: list[PartPlan] = []
    for _, group in groupby(tasks, key=lambda task: task.index):
        ranges = list(group)
        if len(ranges) < 2:
            continue
        first = ranges[0]
        spools = [first.out / SPOOL_DIR / f"{task.tag}.jsonl" for task in ranges]
        stem = first.out / f"part-{first.index:05d}"
        plans += plan_parts(spools, stem, first.config.shard_docs, first.config.compress_output)
    if plans:
        run_tasks(write_part, plans, workers, desc="assemble parts")
    if tasks:
        shutil.rmtree(tasks[0].out / SPOOL_DIR, ignore_errors=True)
