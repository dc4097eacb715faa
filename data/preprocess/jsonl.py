"""Streaming JSONL reading (plain, .gz, .zst) that never raises on bad data, and sharded writing.

Reading yields a :class:`Document` for each good line and a :class:`Malformed` for each bad one
(invalid UTF-8, not JSON, not an object, no text field, text not a string, a truncated compressed
file), so a stage counts every line it saw. Writing goes to ``<name>.tmp`` files renamed on close.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from megatron_patches.errors import ConfigError

from .document import Document, Malformed

_RAW_PREVIEW = 2000  # characters of a bad line kept in rejected/malformed.jsonl
_SURROGATE = re.compile("[\ud800-\udfff]")


def expand_inputs(patterns: list[str], base: Path | None = None) -> list[Path]:
    """Globs (relative to `base`) to a sorted, de-duplicated file list; an empty match is an error."""
    files: list[Path] = []
    for pattern in patterns:
        full = str(Path(base or ".") / pattern) if not os.path.isabs(pattern) else pattern
        matched = sorted(glob.glob(full, recursive=True))
        if not matched:
            raise ConfigError(f"input {pattern!r} matches no file")
        files += [Path(m) for m in matched if Path(m).is_file()]
    unique = sorted(set(files), key=str)
    if not unique:
        raise ConfigError(f"inputs {patterns} match no regular file")
    return unique


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as err:
            raise ConfigError(f"{path}: reading .zst needs `pip install zstandard`") from err
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
    return open(path, "rb")  # noqa: SIM115


def iter_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, raw bytes) pairs; (n, None) once if the file ends in a broken stream."""
    lineno = 0
    try:
        with _open_binary(path) as raw:
            for lineno, line in enumerate(io.BufferedReader(raw, 1 << 20), start=1):  # noqa: B007
                yield lineno, line
    except (EOFError, OSError, zlib.error) as err:
        if isinstance(err, FileNotFoundError | PermissionError):
            raise ConfigError(f"cannot read {path}: {err}") from err
        yield lineno + 1, None
    except Exception as err:  # zstandard.ZstdError and friends: a corrupt stream, not a bug of ours
        if type(err).__module__.startswith("zstandard"):
            yield lineno + 1, None
        else:
            raise


def parse_line(raw: bytes, text_field: str, path: str, lineno: int) -> Document | Malformed | None:
    """One JSONL line to a Document, a Malformed, or None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        preview = raw[:_RAW_PREVIEW].decode("utf-8", errors="replace")
        return Malformed("invalid_utf8", path, lineno, preview)
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return Malformed("invalid_json", path, lineno, line[:_RAW_PREVIEW])
    if not isinstance(record, dict):
        return Malformed("not_an_object", path, lineno, line[:_RAW_PREVIEW])
    text = record.get(text_field)
    if text is None:
        return Malformed("missing_text", path, lineno, line[:_RAW_PREVIEW])
    if not isinstance(text, str):
        return Malformed("text_not_string", path, lineno, line[:_RAW_PREVIEW])
    if _SURROGATE.search(text):  # a JSON escape such as "\ud800": no UTF-8 writer accepts it
        return Malformed("invalid_utf8", path, lineno, line[:_RAW_PREVIEW])
    return Document.from_record(record, text_field, f"{Path(path).name}:{lineno}", lineno)


def read_documents(path: Path, text_field: str = "text") -> Iterator[tuple[Document | Malformed, int]]:
    """(document or malformed record, raw byte length) for every non-blank line of `path`."""
    for lineno, raw in iter_lines(path):
        if raw is None:
            yield Malformed("truncated_input", str(path), lineno, ""), 0
            return
        item = parse_line(raw, text_field, str(path), lineno)
        if item is not None:
            yield item, len(raw)


class ShardWriter:
    """Writes JSONL lines into numbered parts `<stem>-00000.jsonl`, each renamed into place when full."""

    def __init__(self, directory: Path, stem: str, max_docs: int = 100_000, compress: bool = False):
        self.directory, self.stem, self.max_docs, self.compress = directory, stem, max_docs, compress
        self.parts: list[Path] = []
        self._handle: IO[str] | None = None
        self._count = 0
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, line: str) -> None:
        if self._handle is None or self._count >= self.max_docs:
            self._roll()
        assert self._handle is not None
        self._handle.write(line)
        self._handle.write("\n")
        self._count += 1

    def _roll(self) -> None:
        self._finish_part()
        suffix = ".jsonl.gz" if self.compress else ".jsonl"
        final = self.directory / f"{self.stem}-{len(self.parts):05d}{suffix}"
        tmp = final.with_name(final.name + ".tmp")
        raw = gzip.open(tmp, "wt", encoding="utf-8") if self.compress else open(tmp, "w", encoding="utf-8")  # noqa: SIM115
        self._handle, self._count = raw, 0
        self.parts.append(final)

    def _finish_part(self) -> None:
        if self._handle is not None:
            self._handle.close()
            final = self.parts[-1]
            os.replace(final.with_name(final.name + ".tmp"), final)
            self._handle = None

    def close(self) -> list[Path]:
        self._finish_part()
        return self.parts


class RejectWriter:
    """One `rejected/<rule>.<task>.jsonl` per rule and task; :func:`merge_rejects` joins them per rule."""

    def __init__(self, directory: Path, task: int):
        self.directory, self.task = directory, task
        self._handles: dict[str, IO[str]] = {}

    def write(self, rule: str, line: str) -> None:
        handle = self._handles.get(rule)
        if handle is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = open(self.directory / f"{rule}.{self.task:05d}.part", "w", encoding="utf-8")  # noqa: SIM115
            self._handles[rule] = handle
        handle.write(line)
        handle.write("\n")

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()


def merge_rejects(directory: Path) -> None:
    """Concatenate every task's `<rule>.<task>.part` into `<rule>.jsonl`, in task order."""
    if not directory.is_dir():
        return
    parts = sorted(directory.glob("*.part"))
    rules = sorted({p.name.rsplit(".", 2)[0] for p in parts})
    for rule in rules:
        with open(directory / f"{rule}.jsonl", "wb") as out:
            for part in (p for p in parts if p.name.rsplit(".", 2)[0] == rule):
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                part.unlink()
