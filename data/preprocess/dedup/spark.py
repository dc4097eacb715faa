"""Dedup on Apache Spark (`pip install '.[spark]'`), for corpora one machine cannot hold.

The same functions as the local engine do the work: executors read the tasks (files, or byte ranges
of large plain files, one partition each) with the project's reader
and hash them with `MinHasher`; buckets are Spark groups whose star edges come from `lsh.star_edges`;
verification runs on executors; only the verified edges (the duplicates, not the corpus) reach the
driver, which clusters them with `lsh.UnionFind` and picks keepers with `lsh.removals`. The filter
pass is again one partition per task, writing numbered parts (or, for ranges, spools that the
driver cuts into the same parts) into the output directory, which must therefore be on a filesystem
every executor sees (local disk in `local[N]`, NFS/Lustre on a cluster).

Cluster use: install this package on the executors (or ship it with `--py-files`) and run
``spark-submit data/spark_submit.py dedup --engine spark --input ... --out ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import PipelineConfig
from ..engines.local import Progress
from ..engines.spark import ignore_progress
from ..engines.spark import spark_session as engine_session
from ..report import Stats
from ..stage import FileTask
from .hashing import estimated_jaccard, exact_jaccard
from .local import drop_lists
from .lsh import DocInfo, UnionFind, removals, split_gid, star_edges
from .tasks import filter_file, filter_tasks, record_band_keys, shingles_for_lines, signature_records

if TYPE_CHECKING:
    from pyspark import RDD, SparkContext
    from pyspark.sql import SparkSession


def spark_session(config: PipelineConfig) -> SparkSession:
    """The session of the dedup stage: `dedup.spark_master` and `dedup.spark_conf` (which default to
    the top-level `spark_master` and `spark_conf`)."""
    return engine_session(config.dedup.spark_master, config.dedup.spark_conf)


def _keys(record, config: PipelineConfig) -> list:
    d = config.dedup
    keys = [((j, key), record.gid) for j, key in enumerate(record_band_keys([record], d)[0].tolist())]
    if d.exact:
        keys.append((("exact", record.exact), record.gid))
    return keys


def _verified(sc, candidates, records, files, config: PipelineConfig):
    d = config.dedup
    if d.verify == "none":
        return candidates
    if d.verify == "signature":
        signatures = records.mapValues(lambda r: r.signature)
    else:
        wanted: dict[int, set[int]] = {}
        for gid in candidates.flatMap(lambda e: e).distinct().collect():
            index, line = split_gid(gid)
            wanted.setdefault(index, set()).add(line)
        lines = sc.broadcast(wanted)
        signatures = files.flatMap(
            lambda f: shingles_for_lines(f[0], Path(f[1]), lines.value.get(f[0], set()), config, f[2])
        )
    measure = estimated_jaccard if d.verify == "signature" else exact_jaccard
    # (gid, (signature or shingles, its channel's threshold)); a pair needs the stricter threshold
    signed = signatures.join(records.mapValues(lambda r: r.threshold))
    return (
        candidates.join(signed)  # (a, (b, (sa, ta)))
        .map(lambda kv: (kv[1][0], (kv[0], kv[1][1])))
        .join(signed)  # (b, ((a, (sa, ta)), (sb, tb)))
        .filter(lambda kv: measure(kv[1][0][1][0], kv[1][1][0]) >= max(kv[1][0][1][1], kv[1][1][1]))
        .map(lambda kv: (kv[1][0][0], kv[0]))
    )


def run_spark(tasks: list[FileTask], config: PipelineConfig) -> Stats:
    from pyspark.sql import SparkSession

    owned = SparkSession.getActiveSession() is None
    spark = spark_session(config)
    try:
        return _run(spark.sparkContext, tasks, config)
    finally:
        if owned:
            spark.stop()


def _run(sc: SparkContext, tasks: list[FileTask], config: PipelineConfig) -> Stats:
    files = sc.parallelize([(t.index, str(t.path), t.span) for t in tasks], max(1, len(tasks)))
    records = (
        files.flatMap(lambda f: signature_records(f[0], Path(f[1]), config, f[2]))
        .keyBy(lambda r: r.gid)
        .cache()
    )
    edges = _bucket_edges(records, config)
    exact_edges = edges.filter(lambda e: e[0]).map(lambda e: (e[1], e[2])).distinct()
    candidates = edges.filter(lambda e: not e[0]).map(lambda e: (e[1], e[2])).distinct()
    stats = Stats({"edges/exact": exact_edges.count(), "edges/candidates": candidates.count()})
    verified = _verified(sc, candidates, records, files, config).collect()
    stats["edges/verified"] += len(verified)
    drops = _drop_lists(sc, records, exact_edges.collect() + verified, tasks, config, stats)
    results = _filter_files(sc, tasks, drops, _boilerplate_lines(records, config, stats))
    records.unpersist()
    edges.unpersist()
    for result in results:
        stats += result
    return stats


def _bucket_edges(records: RDD, config: PipelineConfig) -> RDD:
    """(is exact, a, b) star edges of every LSH bucket and exact-hash group, cached."""
    return (
        records.values()
        .flatMap(lambda r: _keys(r, config))
        .groupByKey()
        .flatMap(lambda kv: [(kv[0][0] == "exact", a, b) for a, b in star_edges(kv[1])])
        .cache()
    )


def _drop_lists(
    sc: SparkContext,
    records: RDD,
    edges: list[tuple[int, int]],
    tasks: list[FileTask],
    config: PipelineConfig,
    stats: Stats,
) -> dict[int, dict]:
    """Cluster the duplicate edges on the driver and pick keepers, as the local engine does."""
    uf = UnionFind()
    for a, b in edges:
        uf.union(a, b)
    clusters = uf.clusters()
    stats["clusters"] += len(clusters)
    members = sc.broadcast({gid for group in clusters.values() for gid in group})
    info = records.filter(lambda kv: kv[0] in members.value).collectAsMap()
    infos = {gid: DocInfo(r.length, r.quality, r.exact) for gid, r in info.items()}
    removal = removals(clusters, infos, config.dedup.keep)
    return drop_lists(removal, tasks, lambda a, b: estimated_jaccard(info[a].signature, info[b].signature))


def _boilerplate_lines(records: RDD, config: PipelineConfig, stats: Stats) -> frozenset[int]:
    """Line-level dedup: what `local.boilerplate_lines` finds, counted with a reduceByKey."""
    least = config.dedup.line_min_docs
    if not least:
        return frozenset()
    frequent = (
        records.values()
        .flatMap(lambda r: [(key, 1) for key in r.lines.tolist()])
        .reduceByKey(lambda a, b: a + b)
        .filter(lambda kv: kv[1] >= least)
        .keys()
        .collect()
    )
    stats["boilerplate_lines"] += len(frequent)
    return frozenset(frequent)


def _filter_files(
    sc: SparkContext, tasks: list[FileTask], drops: dict[int, dict], boilerplate: frozenset[int]
) -> list[Stats]:
    filters = filter_tasks(tasks, drops, boilerplate)
    return (
        sc.parallelize(filters, max(1, len(filters)))
        .map(lambda t: filter_file(t, Progress(ignore_progress)))
        .collect()
    )
