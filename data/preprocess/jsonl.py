"""Streaming JSONL reading (plain, .gz, .zst) that never raises on bad data, and sharded writing.

Reading yields a :class:`Document` for each good line and a :class:`Malformed` for each bad one
(invalid UTF-8, not JSON, not an object, no text field, text not a string, a truncated compressed
file), so a stage counts every line it saw. Writing goes to hidden ``.<name>.tmp`` files renamed on close.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import orjson

from megatron_patches.errors import ConfigError
from megatron_patches.paths import commit_file, temp_file

from .document import Document, Malformed
from .ranges import WHOLE_FILE, Span, is_compressed

_RAW_PREVIEW = 2000  # characters of a bad line kept in rejected/malformed.jsonl
_SURROGATE = re.compile("[\ud800-\udfff]")
_ID_TYPES = (str, int, type(None))  # types of "id" and "channel" that parse_text_line keeps
_CHANNEL_TYPES = (str, type(None))


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # s3://, hdfs://, gs://, file:/ (Path keeps one slash)


def refuse_url(value: str | Path, what: str) -> None:
    """Stages read and write with local file calls, so `hdfs://x` would be a local folder `hdfs:/x`."""
    if _URL.match(str(value)):
        raise ConfigError(
            f"{what} {str(value)!r} is a URL, but data.preprocess reads and writes file system paths only: "
            "mount the store (s3fs, gcsfuse, an HDFS NFS gateway) on every machine and pass the mounted path"
        )


def expand_inputs(patterns: list[str], base: Path | None = None) -> list[Path]:
    """Globs (relative to `base`) to a sorted, de-duplicated file list; an empty match is an error."""
    files: list[Path] = []
    for pattern in patterns:
        refuse_url(pattern, "input")
        full = str(Path(base or ".") / pattern) if not os.path.isabs(pattern) else pattern
        matched = sorted(glob.glob(full, recursive=True))
        if not matched:
            raise ConfigError(f"input {pattern!r} matches no file")
        files += [Path(m) for m in matched if Path(m).is_file()]
    unique = sorted(set(files), key=str)
    if not unique:
        raise ConfigError(f"inputs {patterns} match no regular file")
    return unique


_CHUNK = 1 << 16


def _plain_chunks(path: Path, span: Span = WHOLE_FILE) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        handle.seek(span.start)
        remaining = span.end - span.start if span.end is not None else None
        while remaining is None or remaining > 0:
            chunk = handle.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


def _gzip_chunks(path: Path) -> Iterator[bytes]:
    # zlib directly rather than GzipFile, which can lose the data it decompressed just before a cut.
    member = zlib.decompressobj(wbits=31)
    started = False
    for raw in _plain_chunks(path):
        while raw:
            started = True
            yield member.decompress(raw)
            raw = member.unused_data if member.eof else b""
            if member.eof:  # multi-member gzip (concatenated files)
                member, started = zlib.decompressobj(wbits=31), False
    if started and not member.eof:
        raise EOFError(f"{path}: gzip stream ends inside a member")


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    try:
        import zstandard
    except ImportError as err:
        raise ConfigError(f"{path}: reading .zst needs `pip install zstandard`") from err
    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    started = False
    for raw in _plain_chunks(path):
        while raw:
            started = True
            yield frame.decompress(raw)
            raw = frame.unused_data if frame.eof else b""
            if frame.eof:  # concatenated frames (pzstd, appended files)
                frame, started = decompressor.decompressobj(), False
    if started and not frame.eof:
        raise EOFError(f"{path}: zstd stream ends inside a frame")


def _chunks(path: Path, span: Span) -> Iterator[bytes]:
    if is_compressed(path) and not span.is_whole_file:
        raise ValueError(f"{path}: a compressed file cannot be read from the middle ({span})")
    if path.name.endswith(".gz"):
        return _gzip_chunks(path)
    if path.name.endswith(".zst"):
        return _zstd_chunks(path)
    return _plain_chunks(path, span)


def iter_lines(path: Path, span: Span = WHOLE_FILE) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number in the file, raw bytes without the newline) for the lines of `span`;
    (n, None) once if the stream breaks."""
    if not path.is_file():
        raise ConfigError(f"cannot read {path}: not a file")
    lineno, pending = span.first_line - 1, b""
    try:
        for chunk in _chunks(path, span):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                lineno += 1
                yield lineno, line
    except (EOFError, OSError, zlib.error) as err:
        if isinstance(err, PermissionError):
            raise ConfigError(f"cannot read {path}: {err}") from err
        yield lineno + 1, None
        return
    except Exception as err:  # zstandard.ZstdError: a corrupt stream, not a bug of ours
        if not type(err).__module__.startswith("zstandard"):
            raise
        yield lineno + 1, None
        return
    if pending:
        yield lineno + 1, pending


def parse_line(
    raw: bytes, text_field: str, path: str, lineno: int, name: str | None = None
) -> Document | Malformed | None:
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
    # a JSON escape such as "\ud800": no UTF-8 writer accepts it (valid UTF-8 holds no surrogate)
    if "\\u" in line and _SURROGATE.search(text):
        return Malformed("invalid_utf8", path, lineno, line[:_RAW_PREVIEW])
    return Document.from_record(record, text_field, f"{name or Path(path).name}:{lineno}", lineno)


def parse_text_line(
    raw: bytes, text_field: str, path: str, lineno: int, name: str | None = None
) -> Document | Malformed | None:
    """:func:`parse_line` for stages that read only the text, id and channel (tokenize), fast.

    orjson is several times faster than json, accepts no line that json rejects, and reads strings
    and 64-bit integers the same; so a line it parses with plain-typed text, id and channel becomes
    a Document with those fields (the others are not kept), and any other line goes to
    :func:`parse_line`, which classifies it as before."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        record = None
    if type(record) is dict:
        text, doc_id, channel = record.get(text_field), record.get("id"), record.get("channel")
        if type(text) is str and type(doc_id) in _ID_TYPES and type(channel) in _CHANNEL_TYPES:
            doc_id = f"{name or Path(path).name}:{lineno}" if doc_id is None else str(doc_id)
            return Document(text, doc_id, channel=channel, line=lineno)
    return parse_line(raw, text_field, path, lineno, name)


Parser = Callable[[bytes, str, str, int, str | None], Document | Malformed | None]


def read_documents(
    path: Path, text_field: str = "text", parse: Parser = parse_line, span: Span = WHOLE_FILE
) -> Iterator[tuple[Document | Malformed, int]]:
    """(document or malformed record, raw byte length) for every non-blank line of `span` of `path`."""
    shown, name = str(path), path.name  # once, not per line
    for lineno, raw in iter_lines(path, span):
        if raw is None:
            yield Malformed("truncated_input", shown, lineno, ""), 0
            return
        item = parse(raw, text_field, shown, lineno, name)
        if item is not None:
            yield item, len(raw) + 1


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
        tmp = temp_file(final)
        raw = gzip.open(tmp, "wt", encoding="utf-8") if self.compress else open(tmp, "w", encoding="utf-8")  # noqa: SIM115
        self._handle, self._count = raw, 0
        self.parts.append(final)

    def _finish_part(self) -> None:
        if self._handle is not None:
            self._handle.close()
            final = self.parts[-1]
            commit_file(temp_file(final), final)
            self._handle = None

    def close(self) -> list[Path]:
        self._finish_part()
        return self.parts


class RejectWriter:
    """One `rejected/<rule>.<task>.part` per rule and task; :func:`merge_rejects` joins them per rule.
    `task` names the task so that its files sort in input order (`<file>-<range>`, zero-padded)."""

    def __init__(self, directory: Path, task: str):
        self.directory, self.task = directory, task
        self._handles: dict[str, IO[str]] = {}

    def write(self, rule: str, line: str) -> None:
        handle = self._handles.get(rule)
        if handle is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = open(self.directory / f"{rule}.{self.task}.part", "w", encoding="utf-8")  # noqa: SIM115
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
