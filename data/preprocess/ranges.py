"""Byte ranges of a large plain JSONL file, so that one big file keeps every core busy.

A plain file larger than `range_mb` is cut into ranges of about that size; each cut is moved to the
start of the next line (a newline byte never occurs inside a multi-byte UTF-8 character, so this
holds for any content, broken lines included), so every line belongs to exactly one range. Each
range is one task. Line numbers stay those of the whole file (document ids, dedup gids and
malformed-line reports depend on them): a parallel pass counts the newlines before every cut.

Compressed files (.gz, .zst) cannot be entered in the middle and stay one task each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .engines.local import Progress, map_tasks
from .report import Stats

_SCAN = 1 << 16  # bytes read at a time looking for a newline
_COUNT = 1 << 24  # bytes read at a time counting newlines
COMPRESSED_SUFFIXES = (".gz", ".zst")


@dataclass(frozen=True)
class Span:
    """Where a task reads in its file: bytes [start, end) holding lines [first_line, end_line)."""

    part: int = 0  # position among the ranges of its file
    start: int = 0
    end: int | None = None  # None: to the end of the file
    first_line: int = 1
    end_line: int | None = None  # the first line of the next range; None: no next range

    @property
    def is_whole_file(self) -> bool:
        return self.start == 0 and self.end is None

    def holds_line(self, line: int) -> bool:
        return self.first_line <= line and (self.end_line is None or line < self.end_line)


WHOLE_FILE = Span()


def is_compressed(path: Path) -> bool:
    return path.name.endswith(COMPRESSED_SUFFIXES)


def range_bytes(range_mb: float) -> int:
    """The configured range size in bytes; 0 (or less) turns splitting off."""
    return max(int(range_mb * 1e6), 0)


def next_line_start(path: Path, offset: int) -> int:
    """The first line start at or after `offset` (`offset` itself when a newline precedes it)."""
    if offset <= 0:
        return 0
    with open(path, "rb") as handle:
        handle.seek(offset - 1)
        position = offset - 1
        while chunk := handle.read(_SCAN):
            newline = chunk.find(b"\n")
            if newline >= 0:
                return position + newline + 1
            position += len(chunk)
    return position


def cut_points(path: Path, size_bytes: int) -> list[int]:
    """Byte offsets where the ranges of `path` start: [0] for a small or compressed file."""
    size = path.stat().st_size
    if size_bytes <= 0 or size <= size_bytes or is_compressed(path):
        return [0]
    starts = [0]
    for nominal in range(size_bytes, size, size_bytes):
        if nominal <= starts[-1]:  # a line longer than a range already took this cut
            continue
        start = next_line_start(path, nominal)
        if start >= size:
            break
        starts.append(start)
    return starts


@dataclass(frozen=True)
class _Stretch:
    path: Path
    start: int
    end: int


def _count_newlines(stretch: _Stretch, progress: Progress) -> Stats:
    newlines = 0
    with open(stretch.path, "rb") as handle:
        handle.seek(stretch.start)
        remaining = stretch.end - stretch.start
        while remaining > 0 and (chunk := handle.read(min(_COUNT, remaining))):
            remaining -= len(chunk)
            newlines += chunk.count(b"\n")
            progress.update(0, len(chunk))
    return Stats({"newlines": newlines})


def _spans(starts: list[int], newlines: list[int]) -> list[Span]:
    """Spans from range starts and the newline count of every range but the last."""
    first_lines = [1]
    for count in newlines:
        first_lines.append(first_lines[-1] + count)
    ends: list[int | None] = [*starts[1:], None]
    end_lines: list[int | None] = [*first_lines[1:], None]
    columns = zip(starts, ends, first_lines, end_lines, strict=True)
    return [Span(part, *column) for part, column in enumerate(columns)]


def split_files(paths: list[Path], size_bytes: int, workers: int, desc: str) -> list[list[Span]]:
    """The spans of every file, in file order; the newlines before each cut are counted in parallel."""
    starts = [cut_points(path, size_bytes) for path in paths]
    stretches = [
        _Stretch(path, a, b)
        for path, cuts in zip(paths, starts, strict=True)
        for a, b in zip(cuts, cuts[1:], strict=False)
    ]
    counts = iter(s["newlines"] for s in map_tasks(_count_newlines, stretches, workers, desc))
    return [_spans(cuts, [next(counts) for _ in cuts[1:]]) for cuts in starts]
