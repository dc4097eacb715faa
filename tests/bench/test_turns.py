"""bench/turns.py: contenders really take turns slice by slice (the method the tokenize figures rely
on), and a failing contender is reported by name."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # spawned contenders inherit it

from turns import Turns, in_turns  # noqa: E402


def stamp_each_slice(slices: int, turns: Turns) -> list[float]:
    stamps = []
    with turns.timed():
        for _ in range(slices):
            stamps.append(time.monotonic())
            turns.advance(1)
    return stamps


def fail_at_once(turns: Turns) -> None:
    raise ValueError("no input")


def test_contenders_alternate_one_slice_at_a_time():
    stamps = in_turns({name: (stamp_each_slice, (20,), 20) for name in ("a", "b", "c")})
    merged = sorted((t, name) for name, times in stamps.items() for t in times)
    assert [name for _, name in merged] == ["a", "b", "c"] * 20


def test_a_failing_contender_is_named():
    with pytest.raises(RuntimeError, match="contender broken failed"):
        in_turns({"fine": (stamp_each_slice, (5,), 5), "broken": (fail_at_once, (), 5)})
