"""Skipped sample windows: data a roll-back (or a human) decided the run must never read.

A window is ``[start, end, phase]``: sample ids ``start..end`` (both included) of the
phase's blended dataset, the ids the loss-spike log and ``rollbacks.jsonl`` print.
``data.skip_samples`` takes ``[start, end]`` (the ``main`` phase) or ``[start, end, phase]``.

The run reads its phase dataset at *positions* (``phase_sample_offset``: a pure function of
the iteration); :func:`dataset_index` maps a position to the sample id it reads, stepping
over every window at or before it. So the samples after a window are exactly those an
unaffected run reads, shifted by the number of samples skipped before them, and the map
needs nothing but the windows: they travel in every checkpoint's common state
(``skip_samples``), independent of the config.
"""

from __future__ import annotations

from megatron_patches.errors import ConfigError

Window = tuple[int, int, str]  # (first sample id, last sample id, phase name)


def parse(raw: list, where: str = "data.skip_samples", default_phase: str = "main") -> list[Window]:
    """``[[start, end], [start, end, phase], ...]`` as windows; anything else is one ConfigError."""
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"{where} must be a list of [start, end] sample-id pairs, got {raw!r}")
    windows = []
    for item in raw:
        if not isinstance(item, (list, tuple)) or len(item) not in (2, 3):
            raise ConfigError(f"{where}: {item!r} is not [start, end] or [start, end, phase]")
        start, end = item[0], item[1]
        phase = item[2] if len(item) == 3 else default_phase
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
        if not ints or start < 0 or end < start or not isinstance(phase, str):
            raise ConfigError(f"{where}: {item!r} needs integer sample ids 0 <= start <= end (both skipped)")
        windows.append((start, end, phase))
    return merge(windows)


def merge(windows: list[Window]) -> list[Window]:
    """Sorted by phase and start, overlapping or touching windows of a phase joined."""
    merged: list[Window] = []
    for start, end, phase in sorted(windows, key=lambda w: (w[2], w[0], w[1])):
        if merged and merged[-1][2] == phase and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]), phase)
        else:
            merged.append((start, end, phase))
    return merged


def of_phase(windows: list[Window], phase: str) -> list[tuple[int, int]]:
    return [(start, end) for start, end, name in windows if name == phase]


def dataset_index(position: int, spans: list[tuple[int, int]]) -> int:
    """The sample id the run reads at ``position``: each window at or before it is stepped over."""
    index = position
    for start, end in spans:  # sorted and disjoint: each shift can only reach later windows
        if index >= start:
            index += end - start + 1
    return index


def skipped_count(spans: list[tuple[int, int]]) -> int:
    """Samples the windows hold: how much further the dataset must reach."""
    return sum(end - start + 1 for start, end in spans)


def to_json(windows: list[Window]) -> list[list]:
    return [[start, end, phase] for start, end, phase in windows]
