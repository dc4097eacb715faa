"""Exact and MinHash-LSH near-duplicate removal, on one machine or on Apache Spark.

Both engines run the same per-file code (`tasks.py`) and the same cluster logic (`lsh.py`), so for
the same input and config they keep exactly the same documents.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

from ..config import DedupConfig, PipelineConfig
from ..jsonl import merge_rejects
from ..report import write_report
from ..stage import FileTask, staged_dir


def warn_if_threshold_unused(d: DedupConfig) -> None:
    """With `verify: none` every LSH candidate pair is a duplicate: `threshold` plays no part."""
    if d.verify == "none":
        effective = (1 / d.bands) ** (1 / d.rows)
        warnings.warn(
            f"dedup.verify is none, so dedup.threshold ({d.threshold}) is not applied: every LSH "
            f"candidate pair is removed; bands x rows = {d.bands} x {d.rows} alone set the cut-off "
            f"(about Jaccard {effective:.2f}). Use verify: signature or exact to apply the threshold.",
            UserWarning,
            stacklevel=3,
        )


def run_dedup(config: PipelineConfig, inputs: list[Path], out: Path, overwrite: bool = False) -> dict:
    started = time.time()
    warn_if_threshold_unused(config.dedup)
    with staged_dir(out, overwrite) as tmp:
        tasks = [FileTask(i, path, tmp, config) for i, path in enumerate(inputs)]
        if config.dedup.engine == "spark":
            from .spark import run_spark

            stats = run_spark(tasks, config)
        else:
            from .local import run_local

            stats = run_local(tasks, config)
        merge_rejects(tmp / "rejected")
        outputs = sorted(p.name for p in tmp.iterdir() if p.name.startswith("part-"))
        params = dataclasses.asdict(config.dedup)
        return write_report(
            tmp, "dedup", stats, started, inputs=[str(p) for p in inputs], outputs=outputs, params=params
        )
