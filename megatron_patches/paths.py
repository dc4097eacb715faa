"""Output paths that cannot destroy inputs, and temporary directories that name their owner.

Every command that replaces an output directory (``tools.convert --force``,
``data.preprocess --overwrite``, the trainer's checkpoint pruning) would delete
an input that sits at, under or above that output. :func:`refuse_overlap` is
the one rule they all apply, before anything is written: no output may equal,
contain or lie inside an input, symlinks resolved.

A killed writer leaves its temporary directory behind (13 GB for a 7B
conversion). :func:`owned_temp_dir` names such a directory after its owner
(host and pid) so that a later run on the same output can tell a dead owner's
leftovers from a live writer's: :func:`clean_stale_temp_dirs` removes those
whose owner ran on this host and is gone, and reports the rest.

Every write-then-rename in the project goes through the atomic helpers here
(a test scans for others): :func:`atomic_dir` for an output directory (the
converter's ``--force``, a data stage's ``--overwrite``, an eval export; the
trainer's ranks use its halves :func:`begin_atomic_dir` and
:func:`commit_atomic_dir`), and :func:`atomic_file` / ``write_*_atomic`` for
one file (tracker, reports, plots, ``metrics.jsonl``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_patches.errors import ConfigError

PathLike = str | os.PathLike
_UNSAFE = re.compile(r"[^A-Za-z0-9._]")
# <host>-<pid>-<random>: the host may contain '-', so the pid is the last number but one.
_OWNER = re.compile(r"^(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def refuse_overlap(
    outputs: Mapping[str, PathLike], inputs: Mapping[str, PathLike | Iterable[PathLike] | None]
) -> None:
    """Raise ConfigError if any output equals, contains or lies inside any input.

    Keys name where each path came from (``--out``, ``--hf``, ``run_dir``) so
    the one-line error tells the user which setting to change. An input entry
    may be one path, several (``--input a.jsonl b.jsonl``) or None (not given).
    Paths are compared both as written and with symlinks resolved.
    """
    sources = [(name, path, *_forms(path)) for name, path in _flatten(inputs)]  # thousands of files: once
    for out_name, out_path in outputs.items():
        out_written, out_real = _forms(out_path)
        for in_name, in_path, in_written, in_real in sources:
            relation = _relation(out_written, in_written) or _relation(out_real, in_real)
            if relation:
                raise ConfigError(
                    f"{out_name} {_shown(out_path)} {relation} the input {in_name} {_shown(in_path)}, "
                    "which writing there could replace or delete: write the output elsewhere"
                )


def _flatten(inputs: Mapping[str, PathLike | Iterable[PathLike] | None]) -> Iterable[tuple[str, PathLike]]:
    for name, value in inputs.items():
        if isinstance(value, (str, os.PathLike)):
            yield name, value
        elif value is not None:
            yield from ((name, item) for item in value if item is not None)


def _forms(path: PathLike) -> tuple[Path, Path]:
    """The absolute path as written and the one with symlinks resolved."""
    return Path(os.path.abspath(path)), Path(path).resolve()


def _relation(out: Path, source: Path) -> str | None:
    if out == source:
        return "is"
    if out in source.parents:
        return "contains"
    if source in out.parents:
        return "lies inside"
    return None


def _shown(given: PathLike) -> str:
    """The path as the user wrote it, plus where it really points when a symlink moved it."""
    written, real = _forms(given)
    return str(given) if written == real else f"{given} (-> {real})"


def _host() -> str:
    return _UNSAFE.sub("_", socket.gethostname())


def owner_tag(pid: int | None = None) -> str:
    """``<host>-<pid>`` of this process (or of ``pid`` on this host), safe in a file name."""
    return f"{_host()}-{os.getpid() if pid is None else pid}"


def owned_temp_dir(target: PathLike, kind: str = "partial") -> Path:
    """The path ``<parent>/.<name>.<kind>-<host>-<pid>-<random>`` beside ``target`` (not created)."""
    target = Path(target)
    return target.parent / f".{target.name}.{kind}-{owner_tag()}-{secrets.token_hex(4)}"


@dataclass
class Cleanup:
    """What :func:`clean_stale_temp_dirs` removed and what it left, with why."""

    removed: list[Path] = field(default_factory=list)
    freed_bytes: int = 0
    kept: list[tuple[Path, str]] = field(default_factory=list)


def clean_stale_temp_dirs(target: PathLike, kind: str = "partial") -> Cleanup:
    """Remove ``target``'s temporary directories whose owner process is gone; report the others.

    Stale means: made on this host by a pid that no longer runs. A directory
    made on another host (a shared file system) or without an owner in its
    name (older versions) is kept, since its writer may still be running.
    """
    target = Path(target)
    prefix = f".{target.name}.{kind}-"
    result = Cleanup()
    if not target.parent.is_dir():
        return result
    for path in sorted(target.parent.iterdir()):
        if not path.name.startswith(prefix) or not path.is_dir() or path.is_symlink():
            continue
        why_kept = _why_kept(path.name[len(prefix) :])
        if why_kept:
            result.kept.append((path, why_kept))
            continue
        result.freed_bytes += _tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        result.removed.append(path)
    return result


def _why_kept(owner: str) -> str | None:
    """None when the owner is a process of this host that is gone; else why the directory stays."""
    match = _OWNER.match(owner)
    if match is None:
        return "its owner is not recorded in its name"
    host, pid = match["host"], int(match["pid"])
    if host != _host():
        return f"written from host {host}"
    if _pid_alive(pid):
        return f"its writer, pid {pid}, is still running"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no such pid can exist
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _tree_bytes(root: Path) -> int:
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):  # vanished meanwhile: nothing to free
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


def human_bytes(count: float) -> str:
    """``3000`` -> ``2.93 KiB``: sizes in messages."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.2f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def report_cleanup(cleanup: Cleanup, writers: str) -> None:
    """One stderr line for the killed ``writers``' leftovers removed, one per leftover kept (and why)."""
    if cleanup.removed:
        names = ", ".join(p.name for p in cleanup.removed)
        print(
            f"removed {len(cleanup.removed)} partial output(s) of killed {writers} ({names}) "
            f"in {cleanup.removed[0].parent}, freed {human_bytes(cleanup.freed_bytes)}",
            file=sys.stderr,
        )
    for path, why in cleanup.kept:
        print(f"left partial output {path} ({why}); delete it once its writer is gone", file=sys.stderr)


def temp_dir_target(temp: PathLike) -> Path:
    """The output an :func:`owned_temp_dir` path will become (itself for any other path): for messages."""
    temp = Path(temp)
    match = re.match(r"^\.(?P<name>.+)\.partial-.+-\d+-[0-9a-f]{8}$", temp.name)
    return temp.with_name(match["name"]) if match else temp


def begin_atomic_dir(
    target: PathLike,
    replace: bool = False,
    exists_hint: str = "pass --force to replace it",
    writers: str = "runs",
) -> Path:
    """Create and return ``target``'s owned temporary directory (see :func:`atomic_dir`).

    For writers that cannot use the context manager, such as the trainer's ranks,
    which all write into the directory rank 0 makes.
    """
    target = Path(target)
    if target.exists() and not replace:
        raise ConfigError(f"output {target} already exists; {exists_hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    report_cleanup(clean_stale_temp_dirs(target), writers)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and lock other
    # users of a shared cluster out of the output; mkdir honours the umask.
    temp = owned_temp_dir(target)
    temp.mkdir()
    return temp


def commit_atomic_dir(temp: PathLike, target: PathLike) -> None:
    """Rename the complete ``temp`` to ``target``; an existing ``target`` goes only once ``temp`` is in."""
    temp, target = Path(temp), Path(target)
    if not temp.is_dir():
        raise ConfigError(f"the writer of {target} left no output directory at {temp}")
    if not target.exists():
        os.rename(temp, target)
        return
    old = owned_temp_dir(target, "old")  # kept by a kill between the renames: it is the last complete one
    os.rename(target, old)
    os.rename(temp, target)
    shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_dir(
    target: PathLike,
    replace: bool = False,
    exists_hint: str = "pass --force to replace it",
    writers: str = "runs",
    create: bool = True,
) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; it becomes ``target`` only when the block succeeds.

    An existing ``target`` is refused (``exists_hint`` says how to allow it)
    unless ``replace``. A failed or interrupted write leaves nothing that looks
    complete: the temporary directory is removed on an exception, and its name
    (``.<name>.partial-<host>-<pid>-<random>``) lets the next writer of
    ``target`` remove it after a kill and report it (``writers`` names them in
    that message). ``create=False`` yields the path uncreated, for a
    subprocess that refuses an existing output.
    """
    temp = begin_atomic_dir(target, replace, exists_hint, writers)
    if not create:
        temp.rmdir()
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    commit_atomic_dir(temp, target)


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield ``.<name>.tmp`` beside ``path``; it replaces ``path`` when the block succeeds, else is removed.

    The name ends in ``.tmp`` so that no glob for the final suffix matches a
    half-written file; it is fixed, so a killed writer's leftover is reused by
    the next write. No fsync: the rename protects against killed processes, the
    failure the project plans for, not against a power cut.
    """
    temp = temp_file(path)
    try:
        yield temp
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    commit_file(temp, path)


def temp_file(path: PathLike) -> Path:
    """The temporary name :func:`atomic_file` writes ``path`` under, for writers that span calls."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def commit_file(temp: PathLike, path: PathLike) -> None:
    """Put the complete ``temp`` (from :func:`temp_file`) in place of ``path`` in one step."""
    os.replace(temp, path)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Replace ``path``'s content with ``text`` (UTF-8) in one step."""
    with atomic_file(path) as temp:
        temp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Replace ``path``'s content with ``data`` in one step."""
    with atomic_file(path) as temp:
        temp.write_bytes(data)


def write_json_atomic(
    path: PathLike, payload: Any, indent: int | None = 2, ensure_ascii: bool = False
) -> None:
    """Replace ``path`` with ``payload`` as JSON (UTF-8, keys in given order) and a newline, in one step."""
    write_text_atomic(path, json.dumps(payload, indent=indent, ensure_ascii=ensure_ascii) + "\n")
