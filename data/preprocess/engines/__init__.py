"""Engines run a stage's per-task work: local multiprocessing (`local.py`) or Apache Spark (`spark.py`,
and `dedup/spark.py` for dedup's own passes). Both run the same task functions, so outputs agree."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from ..config import PipelineConfig
from ..report import Stats
from .local import Progress, reduce_tasks

ENGINES = ("local", "spark")


def add_stats(total: Stats, more: Stats) -> Stats:
    """The default way task results merge: counters added (associative and commutative)."""
    total += more
    return total


def engine_session(config: PipelineConfig) -> AbstractContextManager[Any]:
    """Around a whole `run`: one Spark session for every stage that runs on Spark (the JVM and the
    executors start once), else nothing."""
    if "spark" not in (config.engine, config.dedup.engine):
        return nullcontext()
    from .spark import spark_context

    return spark_context(config)


def map_reduce(
    engine: str,
    config: PipelineConfig,
    fn: Callable[[Any, Progress], Any],
    tasks: Sequence[Any],
    workers: int,
    desc: str,
    combine: Callable[[Any, Any], Any] = add_stats,
) -> Any:
    """`fn(task, progress)` for every task on `engine`, the results merged with `combine`."""
    if not tasks:
        return Stats()
    if engine == "spark":
        from .spark import map_reduce_spark

        return map_reduce_spark(config, fn, tasks, combine)
    return reduce_tasks(fn, tasks, workers, desc, combine)
