"""Exact and MinHash-LSH near-duplicate removal, on one machine or on Apache Spark.

Both engines run the same per-task code (`tasks.py`; a task is a file or a byte range of one) and
the same cluster logic (`lsh.py`), so for the same input and config they keep exactly the same
documents.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from ..config import DedupConfig, PipelineConfig
from ..report import Stats
from ..skeleton import DocumentStage, run_stage_object
from ..stage import FileTask
from .tasks import filter_file


def warn_if_threshold_unused(d: DedupConfig) -> None:
    """With `verify: none` every LSH candidate pair is a duplicate: `threshold` plays no part."""
    if d.verify == "none":
        effective = (1 / d.bands) ** (1 / d.rows)
        warnings.warn(
            f"dedup.verify is none, so dedup.threshold ({d.threshold}) is not applied: every LSH "
            f"candidate pair is removed; bands x rows = {d.bands} x {d.rows} alone set the cut-off "
            f"(about Jaccard {effective:.2f}). Use verify: signature or exact to apply the threshold.",
            UserWarning,
            stacklevel=5,
        )


class DedupStage(DocumentStage):
    """Signatures per task, LSH clusters and keepers on one machine (or the driver), filter per task:
    `execute` is the whole two-pass engine, local (`local.py`) or Spark (`spark.py`)."""

    def __init__(self, config: PipelineConfig, out: Path):
        super().__init__("dedup", config, out, filter_file)

    def prepare(self) -> None:
        warn_if_threshold_unused(self.config.dedup)

    def execute(self, tasks: list[FileTask]) -> Stats:
        if self.config.dedup.engine == "spark":
            from .spark import run_spark

            return run_spark(tasks, self.config)
        from .local import run_local

        return run_local(tasks, self.config)

    def finish(self, tmp: Path, tasks: list[FileTask], result: Stats) -> tuple[Stats, dict]:
        stats, extra = super().finish(tmp, tasks, result)
        return stats, {**extra, "params": dataclasses.asdict(self.config.dedup)}


def run_dedup(config: PipelineConfig, inputs: list[Path], out: Path, overwrite: bool = False) -> dict:
    return run_stage_object(DedupStage(config, out), inputs, overwrite)
