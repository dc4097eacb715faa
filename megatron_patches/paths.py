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
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

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
