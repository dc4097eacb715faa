"""Stages as objects, and the one skeleton that runs any of them on any engine.

A stage declares its per-task work (`work`: a module-level function `(task, progress) -> result`
that reads documents and maps, filters or measures them; run by the engine on all cores or Spark
executors), how task results merge (`combine`, associative and commutative), its global step
(`finish`, on this machine: dedup's LSH lives in its `execute`, tokenize's index merge and order,
the tokenizer's training) and what it reports. :func:`run_stage_object` is the sequence every stage
used to repeat: temporary directory -> tasks -> merge rejects -> global step -> report -> rename.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import PipelineConfig
from .engines import add_stats, map_reduce
from .engines.local import Progress
from .jsonl import merge_rejects
from .report import Stats, write_report
from .spool import assemble_parts
from .stage import FileTask, cpu_workers, file_tasks, staged_dir


class Stage:
    """The default stage: tasks over the input files; subclasses set `name` and `work` (a
    `staticmethod` of a module-level function, which engines pickle by name)."""

    name: str = ""
    work: Callable[[Any, Progress], Any]
    report_inputs = True  # the report lists the input files

    def __init__(self, config: PipelineConfig, out: Path):
        self.config, self.out = config, out

    @property
    def engine(self) -> str:
        return self.config.engine

    def prepare(self) -> None:
        """Checks that must pass before anything is written."""

    def make_tasks(self, inputs: list[Path], tmp: Path) -> list[FileTask]:
        return file_tasks(inputs, tmp, self.config, self.name)

    def combine(self, total: Any, more: Any) -> Any:
        return add_stats(total, more)

    def execute(self, tasks: list[FileTask]) -> Any:
        """Run `work` on every task on the stage's engine and merge the results."""
        workers = cpu_workers(self.config.workers)
        return map_reduce(self.engine, self.config, self.work, tasks, workers, self.name, self.combine)

    def finish(self, tmp: Path, tasks: list[FileTask], result: Any) -> tuple[Stats, dict[str, Any]]:
        """The global step after every task ran: (the stats, what the report adds after `inputs`)."""
        return result, {}


class DocumentStage(Stage):
    """A stage whose tasks write kept documents as numbered parts (clean, label; dedup builds on it)."""

    def __init__(
        self,
        name: str,
        config: PipelineConfig,
        out: Path,
        work: Callable[[FileTask, Progress], Stats],
        extra_report: Callable[[Path], dict] | None = None,
    ):
        super().__init__(config, out)
        self.name, self.work, self.extra_report = name, work, extra_report

    def finish(self, tmp: Path, tasks: list[FileTask], result: Any) -> tuple[Stats, dict[str, Any]]:
        assemble_parts(tasks, cpu_workers(self.config.workers))
        extra = self.extra_report(tmp) if self.extra_report else {}
        return result, {"outputs": part_names(tmp), **extra}


def part_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("part-"))


def run_stage_object(stage: Stage, inputs: list[Path], overwrite: bool) -> dict:
    """Temporary directory -> tasks -> rejects merged -> global step -> report.json -> renamed into
    place; a failure leaves the stage's output untouched."""
    started = time.time()
    stage.prepare()
    with staged_dir(stage.out, overwrite) as tmp:
        tasks = stage.make_tasks(inputs, tmp)
        result = stage.execute(tasks)
        merge_rejects(tmp / "rejected")
        stats, extra = stage.finish(tmp, tasks, result)
        listed = {"inputs": [str(p) for p in inputs]} if stage.report_inputs else {}
        return write_report(tmp, stage.name, stats, started, **listed, **extra)
