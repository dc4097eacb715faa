"""data.num_workers: reads run ahead, yet every answer is what reading in place gives."""

import threading
from functools import partial

from megatron_patches.training.read_ahead import ReadAhead


def _read(log: list, source: dict, offset: int) -> list:
    log.append((offset, threading.current_thread().name))
    return list(source["rows"][offset : offset + 2])


def test_reads_ahead_in_threads_and_drops_a_read_whose_arguments_changed():
    log, source = [], {"rows": list(range(10))}
    ahead = ReadAhead(2)
    assert ahead.get(partial(_read, log, source, 0), [partial(_read, log, source, 2)]) == [0, 1]
    assert ahead.get(partial(_read, log, source, 2), []) == [2, 3]
    assert [name.startswith("read-ahead") for offset, name in log if offset == 2] == [
        True
    ]  # read once, ahead
    other = {"rows": list(range(100, 110))}  # e.g. a roll-back skipped a window: other arguments
    ahead.get(partial(_read, log, source, 4), [partial(_read, log, source, 6)])
    assert ahead.get(partial(_read, log, other, 6), []) == [106, 107]


def test_without_workers_every_read_runs_in_place():
    log, source = [], {"rows": list(range(10))}
    ahead = ReadAhead(0)
    assert ahead.get(partial(_read, log, source, 0), [partial(_read, log, source, 2)]) == [0, 1]
    assert log == [(0, threading.current_thread().name)]
