"""Counters that every step adds to, merged across workers, and the `report.json` they become.

Keys are flat strings such as ``docs_in``, ``rejected/too_short`` or ``channel/zh_web/docs_out`` so
that worker results merge by plain addition; :meth:`Stats.nested` turns the slashes into sections.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from megatron_patches.paths import temp_dir_target, write_json_atomic  # write_json_atomic: re-exported


class Stats(Counter):
    """A Counter of flat keys; `+=` merges the stats of two workers."""

    def nested(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in sorted(self):
            node = out
            *sections, leaf = key.split("/")
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = self[key]
        return out


def write_report(directory: Path, stage: str, stats: Stats, started: float, **extra: Any) -> dict[str, Any]:
    """Write `report.json` (counts, throughput, anything in `extra`) and print a one-line summary."""
    seconds = max(time.time() - started, 1e-9)
    report: dict[str, Any] = {"stage": stage, **stats.nested(), **extra}
    report["seconds"] = round(seconds, 3)
    report["docs_per_s"] = round(stats["docs_in"] / seconds, 1)
    report["mb_per_s"] = round(stats["bytes_in"] / seconds / 1e6, 3)
    write_json_atomic(directory / "report.json", report)
    dropped = stats["docs_in"] - stats["docs_out"]
    print(
        f"[{stage}] {stats['docs_in']} docs in, {stats['docs_out']} out, {dropped} dropped, "
        f"{stats['malformed_lines']} malformed lines; {report['docs_per_s']} docs/s, "
        f"{report['mb_per_s']} MB/s -> {temp_dir_target(directory)}",
        file=sys.stderr,
    )
    return report
