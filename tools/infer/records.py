"""Input prompts and the resumable, ordered JSONL output of batch inference.

Input: one JSON object a line with a ``prompt`` string and an ``id`` (the line
number when absent); ids must be unique. Output: the input object plus
``output``, one line per id, in input order. A line is appended with one write
and flushed; a kill can at worst leave the last line incomplete, and
:func:`recover_output` cuts such a tail off before anything is counted as
done, so a resumed run redoes exactly the ids without a complete line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_patches.errors import ConfigError


def read_inputs(path: Path, prompt_key: str = "prompt") -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"input file {path} does not exist")
    records, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number} is not JSON: {err.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get(prompt_key), str):
            raise ConfigError(f"{path}:{number} has no string {prompt_key!r}")
        record.setdefault("id", number)
        key = json.dumps(record["id"])
        if key in seen:
            raise ConfigError(f"{path}:{number}: id {record['id']!r} appears twice")
        seen.add(key)
        records.append(record)
    if not records:
        raise ConfigError(f"input file {path} has no prompts")
    return records


def recover_output(path: Path) -> set[str]:
    """Ids (as JSON) with a complete line in ``path``; an incomplete last line is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    done = set()
    for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        try:
            done.add(json.dumps(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(
                f"{path}:{number} is not an inference output line; not resuming into it"
            ) from None
    if len(complete) < len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    return done


class OrderedWriter:
    """Appends results to the output in input order, whatever order they arrive in."""

    def __init__(self, path: Path, order: list[str]) -> None:
        self.file = path.open("ab")
        self.order = order  # ids (as JSON) still to write, in input order
        self.next = 0
        self.waiting: dict[str, dict] = {}

    def add(self, record: dict) -> int:
        """Buffer ``record``; write every record now in order. Returns how many were written."""
        self.waiting[json.dumps(record["id"])] = record
        written = 0
        while self.next < len(self.order) and self.order[self.next] in self.waiting:
            line = json.dumps(self.waiting.pop(self.order[self.next]), ensure_ascii=False) + "\n"
            self.file.write(line.encode("utf-8"))
            self.next += 1
            written += 1
        if written:
            self.file.flush()
            os.fsync(self.file.fileno())
        return written

    @property
    def finished(self) -> bool:
        return self.next == len(self.order)

    def close(self) -> None:
        self.file.close()
