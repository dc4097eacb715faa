"""Exact and MinHash-LSH near-duplicate removal, on one machine or on Apache Spark.

Both engines run the same per-file code (`tasks.py`) and the same cluster logic (`lsh.py`), so for
the same input and config they keep exactly the same documents.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..config import PipelineConfig
from ..jsonl import merge_rejects
from ..report import write_report
from ..stage import FileTask, staged_dir


def run_dedup(config: PipelineConfig, inputs: list[Path], out: Path, overwrite: bool = False) -> dict:
    started = time.time()
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
