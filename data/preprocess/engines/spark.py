"""The Spark engine (`engine: spark`, `pip install '.[spark]'`, Java 17+): a stage's per-task work in
one partition per task, its global step on the driver.

Every stage's task (one input file, or one byte range of one) is a partition; the executors run the
very function the local engine runs in its worker processes, writing into the stage's temporary
directory, which must therefore be on a filesystem every executor sees (local disk in `local[N]`,
NFS/Lustre on a cluster). Only the tasks' small results (counters, the tokenizer's sample) come back
to the driver, merged with `treeReduce`. Progress: Spark's console bar and its UI, whose URL is
printed once when the session starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from megatron_patches.errors import ConfigError

from ..config import PipelineConfig
from .local import Progress

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def spark_session(master: str | None, conf: dict) -> SparkSession:
    """The active session, or a new one on `master` (None: what spark-submit configured) with `conf`."""
    try:
        from pyspark.sql import SparkSession
    except ImportError as err:
        raise ConfigError("engine spark needs pyspark: pip install '.[spark]'") from err
    # Executors must run this interpreter (it has this package installed), not whatever `python3` is.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("data.preprocess").config("spark.ui.showConsoleProgress", "true")
    # A task writes its files under fixed names: a speculative twin would write the same files at once.
    builder = builder.config("spark.speculation", "false")
    if master:
        builder = builder.master(master)
    for key, value in conf.items():
        builder = builder.config(str(key), str(value))
    session = builder.getOrCreate()
    url = session.sparkContext.uiWebUrl
    if url and url not in _shown_urls:  # once, not at every stage that joins the session
        _shown_urls.add(url)
        print(f"[spark] progress of every stage: {url}", file=sys.stderr)
    return session


_shown_urls: set[str] = set()


@contextmanager
def spark_context(config: PipelineConfig) -> Iterator[Any]:
    """The SparkContext of the active session, or of a new one (`spark_master`, `spark_conf`) stopped
    on leaving; `run` holds one session for all its stages, so Spark starts once."""
    from pyspark.sql import SparkSession

    owned = SparkSession.getActiveSession() is None
    session = spark_session(config.spark_master, config.spark_conf)
    try:
        yield session.sparkContext
    finally:
        if owned:
            session.stop()


def map_reduce_spark(
    config: PipelineConfig,
    fn: Callable[[Any, Progress], Any],
    tasks: Sequence[Any],
    combine: Callable[[Any, Any], Any],
) -> Any:
    """`fn(task, progress)` for every task, one partition each, results merged by `combine` (which must
    be associative and commutative: `treeReduce` merges in no fixed order)."""
    with spark_context(config) as sc:
        rdd = sc.parallelize(list(tasks), max(1, len(tasks)))
        return rdd.map(lambda task: fn(task, Progress(ignore_progress))).treeReduce(combine)


def ignore_progress(docs: int, nbytes: int) -> None:
    """Spark draws its own progress bar; the per-task counters are not needed here."""
