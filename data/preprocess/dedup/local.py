"""Dedup on one machine with all cores: signatures (parallel) -> clusters (one process) -> filter (parallel).

Pass 1 writes, per task (input file or byte range of one), flat binary arrays under `_work/` (line
numbers, lengths, quality, exact hashes, signatures, one file per LSH band), appended in chunks so a
worker's memory does not grow with its input. Pass 2 reads one band at a time across all tasks:
memory is about 16 bytes per document, plus the shingles of candidate documents when
`verify: exact`. Pass 3 rewrites each task's documents without the duplicates.
"""

from __future__ import annotations

import bisect
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import PipelineConfig
from ..engines.local import Progress, run_tasks
from ..report import Stats
from ..stage import FileTask, cpu_workers
from .hashing import estimated_jaccard, exact_jaccard
from .lines import frequent_from_buckets, write_buckets
from .lsh import DocInfo, Removal, UnionFind, bucket_edges, removals, split_gid
from .tasks import (
    filter_file,
    filter_tasks,
    lines_in_span,
    record_band_keys,
    shingles_for_lines,
    signature_records,
)

_CHUNK = 4096
_COLUMNS = (
    ("lines", np.int64),
    ("length", np.int64),
    ("quality", np.float64),
    ("exact", np.int64),
    ("threshold", np.float64),
)


def _work_dir(task: FileTask) -> Path:
    return task.out / "_work" / task.tag


def signature_task(task: FileTask, progress: Progress) -> Stats:
    """Pass 1 for one task: append signatures and band keys to `_work/<file>-<range>/`."""
    work = _work_dir(task)
    work.mkdir(parents=True, exist_ok=True)
    d = task.config.dedup
    handles = {name: open(work / f"{name}.bin", "wb") for name, _ in _COLUMNS}  # noqa: SIM115
    handles["sig"] = open(work / "sig.bin", "wb")  # noqa: SIM115
    handles.update({f"band{j}": open(work / f"band{j}.bin", "wb") for j in range(d.bands)})  # noqa: SIM115
    stats, chunk = Stats(), []
    try:
        for record in signature_records(task.index, task.path, task.config, task.span):
            chunk.append(record)
            progress.update(1, record.nbytes)
            if len(chunk) >= _CHUNK:
                _flush(chunk, handles, task.config, work)
                chunk = []
        _flush(chunk, handles, task.config, work)
    finally:
        for handle in handles.values():
            handle.close()
    return stats


def _flush(chunk: list, handles: dict, config: PipelineConfig, work: Path) -> None:
    if not chunk:
        return
    columns = {
        "lines": [split_gid(r.gid)[1] for r in chunk],
        "length": [r.length for r in chunk],
        "quality": [r.quality for r in chunk],
        "exact": [r.exact for r in chunk],
        "threshold": [r.threshold for r in chunk],
    }
    for name, dtype in _COLUMNS:
        handles[name].write(np.asarray(columns[name], dtype=dtype).tobytes())
    handles["sig"].write(np.stack([r.signature for r in chunk]).tobytes())
    keys = record_band_keys(chunk, config.dedup)
    for j in range(config.dedup.bands):
        handles[f"band{j}"].write(np.ascontiguousarray(keys[:, j]).tobytes())
    if config.dedup.line_min_docs:
        write_buckets(work, [r.lines for r in chunk])


@dataclass
class _Arrays:
    """Pass-1 output of one task, memory-mapped where it is large."""

    index: int
    lines: np.ndarray
    length: np.ndarray
    quality: np.ndarray
    exact: np.ndarray
    threshold: np.ndarray
    sig: np.ndarray

    @classmethod
    def load(cls, work: Path, index: int, perms: int) -> _Arrays:
        cols = {name: np.fromfile(work / f"{name}.bin", dtype=dtype) for name, dtype in _COLUMNS}
        n = cols["lines"].size
        sig = (
            np.memmap(work / "sig.bin", dtype=np.uint32, mode="r", shape=(n, perms))
            if n
            else np.zeros((0, perms), np.uint32)
        )
        return cls(index, sig=sig, **cols)

    def gids(self) -> np.ndarray:
        return (np.int64(self.index) << np.int64(32)) | self.lines

    def row(self, line: int) -> int:
        return int(np.searchsorted(self.lines, line))


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class Corpus:
    """Pass-1 output of every task, in task order; finds a document's row from its gid."""

    def __init__(self, tasks: list[FileTask], perms: int):
        self.arrays = [_Arrays.load(_work_dir(t), t.index, perms) for t in tasks]
        self._by_file: dict[int, tuple[list[int], list[_Arrays]]] = {}
        for task, arrays in zip(tasks, self.arrays, strict=True):
            first_lines, file_arrays = self._by_file.setdefault(task.index, ([], []))
            first_lines.append(task.span.first_line)
            file_arrays.append(arrays)

    def locate(self, gid: int) -> tuple[_Arrays, int]:
        index, line = split_gid(gid)
        first_lines, file_arrays = self._by_file[index]
        arrays = file_arrays[bisect.bisect_right(first_lines, line) - 1]
        return arrays, arrays.row(line)

    def signature(self, gid: int) -> np.ndarray:
        arrays, row = self.locate(gid)
        return np.asarray(arrays.sig[row])

    def info(self, gid: int) -> DocInfo:
        arrays, row = self.locate(gid)
        return DocInfo(int(arrays.length[row]), float(arrays.quality[row]), int(arrays.exact[row]))

    def similarity(self, a: int, b: int) -> float:
        return estimated_jaccard(self.signature(a), self.signature(b))

    def pair_threshold(self, a: int, b: int) -> float:
        """A pair is a duplicate above the stricter of its two channels' thresholds."""
        (arrays_a, row_a), (arrays_b, row_b) = self.locate(a), self.locate(b)
        return max(float(arrays_a.threshold[row_a]), float(arrays_b.threshold[row_b]))


def find_removals(tasks: list[FileTask], config: PipelineConfig, stats: Stats) -> dict[int, Removal]:
    """Pass 2: candidate edges per band, verification, clusters, one keeper per cluster."""
    d = config.dedup
    corpus = Corpus(tasks, d.perms)
    exact, candidates = candidate_edges(corpus, tasks, config, stats)
    if d.verify == "none":
        verified = candidates
    else:
        similarity = pair_similarities(candidates, corpus, tasks, config)
        verified = [p for p, s in zip(candidates, similarity, strict=True) if s >= corpus.pair_threshold(*p)]
    stats["edges/verified"] += len(verified)
    return cluster_removals(exact + verified, corpus, d.keep, stats)


def candidate_edges(
    corpus: Corpus, tasks: list[FileTask], config: PipelineConfig, stats: Stats
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(exact-hash edges, sorted LSH candidate pairs) of the whole corpus, one band at a time."""
    d = config.dedup
    gids = _concat([a.gids() for a in corpus.arrays])
    exact: list[tuple[int, int]] = []
    if d.exact:
        left, right = bucket_edges(_concat([a.exact for a in corpus.arrays]), gids)
        stats["edges/exact"] += left.size
        exact = list(zip(left.tolist(), right.tolist(), strict=True))
    candidates = set()
    for j in range(d.bands):
        keys = _concat([np.fromfile(_work_dir(t) / f"band{j}.bin", dtype=np.int64) for t in tasks])
        left, right = bucket_edges(keys, gids)
        candidates.update(zip(left.tolist(), right.tolist(), strict=True))
    stats["edges/candidates"] += len(candidates)
    return exact, sorted(candidates)


def pair_similarities(
    pairs: list[tuple[int, int]], corpus: Corpus, tasks: list[FileTask], config: PipelineConfig
) -> list[float]:
    """Jaccard similarity of each pair: from the signatures, or from the shingles (`verify: exact`)."""
    if config.dedup.verify == "signature":
        return [corpus.similarity(a, b) for a, b in pairs]
    wanted: dict[int, list[int]] = {}
    for gid in sorted({g for pair in pairs for g in pair}):
        index, line = split_gid(gid)
        wanted.setdefault(index, []).append(line)
    shingles = {}
    for task in tasks:
        lines = set(lines_in_span(wanted.get(task.index, []), task.span))
        shingles.update(shingles_for_lines(task.index, task.path, lines, config, task.span))
    return [exact_jaccard(shingles[a], shingles[b]) for a, b in pairs]


def cluster_removals(
    edges: list[tuple[int, int]], corpus: Corpus, keep: str, stats: Stats
) -> dict[int, Removal]:
    """Connected components of the duplicate edges, and what each drops to keep its best member."""
    uf = UnionFind()
    for a, b in edges:
        uf.union(a, b)
    clusters = uf.clusters()
    infos = {gid: corpus.info(gid) for members in clusters.values() for gid in members}
    stats["clusters"] += len(clusters)
    return removals(clusters, infos, keep)


def drop_lists(
    removal: dict[int, Removal], tasks: list[FileTask], similarity: Callable[[int, int], float]
) -> dict[int, dict[int, tuple[Removal, str, float]]]:
    """Per file index: line -> (removal, keeper as 'file:line', similarity to the keeper), by line."""
    names = {t.index: t.path.name for t in tasks}
    out: dict[int, dict] = {t.index: {} for t in tasks}
    for gid, rem in sorted(removal.items()):
        index, line = split_gid(gid)
        k_index, k_line = split_gid(rem.keeper)
        out[index][line] = (rem, f"{names[k_index]}:{k_line}", similarity(gid, rem.keeper))
    return out


def boilerplate_lines(tasks: list[FileTask], config: PipelineConfig, stats: Stats) -> frozenset[int]:
    """Line-level dedup: the hashes of lines in at least `dedup.line_min_docs` documents."""
    if not config.dedup.line_min_docs:
        return frozenset()
    frequent = frequent_from_buckets([_work_dir(t) for t in tasks], config.dedup.line_min_docs)
    stats["boilerplate_lines"] += len(frequent)
    return frequent


def run_local(tasks: list[FileTask], config: PipelineConfig) -> Stats:
    workers = cpu_workers(config.workers)
    run_tasks(signature_task, tasks, workers, desc="dedup: signatures")
    stats = Stats()
    removal = find_removals(tasks, config, stats)
    drops = drop_lists(removal, tasks, Corpus(tasks, config.dedup.perms).similarity)
    boilerplate = boilerplate_lines(tasks, config, stats)
    stats += run_tasks(filter_file, filter_tasks(tasks, drops, boilerplate), workers, desc="dedup: filter")
    shutil.rmtree(tasks[0].out / "_work", ignore_errors=True) if tasks else None
    return stats
