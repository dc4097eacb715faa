"""Dedup on one machine with all cores: signatures (parallel) -> clusters (one process) -> filter (parallel).

Pass 1 writes, per input file, flat binary arrays under `_work/` (line numbers, lengths, quality,
exact hashes, signatures, one file per LSH band), appended in chunks so a worker's memory does not
grow with its file. Pass 2 reads one band at a time across all files: memory is about 16 bytes per
document, plus the shingles of candidate documents when `verify: exact`. Pass 3 rewrites each file
without its duplicates.
"""

from __future__ import annotations

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
from .lsh import DocInfo, Removal, UnionFind, bucket_edges, removals, split_gid
from .tasks import FilterTask, filter_file, record_band_keys, shingles_for_lines, signature_records

_CHUNK = 4096
_COLUMNS = (("lines", np.int64), ("length", np.int64), ("quality", np.float64), ("exact", np.int64))


def _work_dir(task: FileTask) -> Path:
    return task.out / "_work" / f"{task.index:05d}"


def signature_task(task: FileTask, progress: Progress) -> Stats:
    """Pass 1 for one file: append signatures and band keys to `_work/<index>/`."""
    work = _work_dir(task)
    work.mkdir(parents=True, exist_ok=True)
    d = task.config.dedup
    handles = {name: open(work / f"{name}.bin", "wb") for name, _ in _COLUMNS}  # noqa: SIM115
    handles["sig"] = open(work / "sig.bin", "wb")  # noqa: SIM115
    handles.update({f"band{j}": open(work / f"band{j}.bin", "wb") for j in range(d.bands)})  # noqa: SIM115
    stats, chunk = Stats(), []
    try:
        for record in signature_records(task.index, task.path, task.config):
            chunk.append(record)
            progress.update(1, record.nbytes)
            if len(chunk) >= _CHUNK:
                _flush(chunk, handles, task.config)
                chunk = []
        _flush(chunk, handles, task.config)
    finally:
        for handle in handles.values():
            handle.close()
    return stats


def _flush(chunk: list, handles: dict, config: PipelineConfig) -> None:
    if not chunk:
        return
    columns = {
        "lines": [split_gid(r.gid)[1] for r in chunk],
        "length": [r.length for r in chunk],
        "quality": [r.quality for r in chunk],
        "exact": [r.exact for r in chunk],
    }
    for name, dtype in _COLUMNS:
        handles[name].write(np.asarray(columns[name], dtype=dtype).tobytes())
    handles["sig"].write(np.stack([r.signature for r in chunk]).tobytes())
    keys = record_band_keys(chunk, config.dedup)
    for j in range(config.dedup.bands):
        handles[f"band{j}"].write(np.ascontiguousarray(keys[:, j]).tobytes())


@dataclass
class _Arrays:
    """Pass-1 output of one file, memory-mapped where it is large."""

    index: int
    lines: np.ndarray
    length: np.ndarray
    quality: np.ndarray
    exact: np.ndarray
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


def find_removals(tasks: list[FileTask], config: PipelineConfig, stats: Stats) -> dict[int, Removal]:
    """Pass 2: candidate edges per band, verification, clusters, one keeper per cluster."""
    d = config.dedup
    arrays = {t.index: _Arrays.load(_work_dir(t), t.index, d.perms) for t in tasks}
    gids = _concat([a.gids() for a in arrays.values()])
    uf = UnionFind()
    if d.exact:
        left, right = bucket_edges(_concat([a.exact for a in arrays.values()]), gids)
        stats["edges/exact"] += left.size
        for a, b in zip(left.tolist(), right.tolist(), strict=True):
            uf.union(a, b)
    candidates = set()
    for j in range(d.bands):
        keys = _concat([np.fromfile(_work_dir(t) / f"band{j}.bin", dtype=np.int64) for t in tasks])
        left, right = bucket_edges(keys, gids)
        candidates.update(zip(left.tolist(), right.tolist(), strict=True))
    stats["edges/candidates"] += len(candidates)
    verified = _verify(sorted(candidates), arrays, tasks, config)
    stats["edges/verified"] += len(verified)
    for a, b in verified:
        uf.union(a, b)
    clusters = uf.clusters()
    infos = {}
    for members in clusters.values():
        for gid in members:
            arr = arrays[split_gid(gid)[0]]
            row = arr.row(split_gid(gid)[1])
            infos[gid] = DocInfo(int(arr.length[row]), float(arr.quality[row]), int(arr.exact[row]))
    stats["clusters"] += len(clusters)
    return removals(clusters, infos, d.keep)


def _signature(arrays: dict[int, _Arrays], gid: int) -> np.ndarray:
    index, line = split_gid(gid)
    arr = arrays[index]
    return np.asarray(arr.sig[arr.row(line)])


def _verify(
    pairs: list[tuple[int, int]], arrays: dict[int, _Arrays], tasks: list[FileTask], config: PipelineConfig
) -> list:
    d = config.dedup
    if d.verify == "none":
        return pairs
    if d.verify == "signature":
        return [
            (a, b)
            for a, b in pairs
            if estimated_jaccard(_signature(arrays, a), _signature(arrays, b)) >= d.threshold
        ]
    wanted: dict[int, set[int]] = {}
    for gid in {g for pair in pairs for g in pair}:
        index, line = split_gid(gid)
        wanted.setdefault(index, set()).add(line)
    shingles = {}
    for task in tasks:
        if task.index in wanted:
            shingles.update(shingles_for_lines(task.index, task.path, wanted[task.index], config))
    return [(a, b) for a, b in pairs if exact_jaccard(shingles[a], shingles[b]) >= d.threshold]


def drop_lists(
    removal: dict[int, Removal], tasks: list[FileTask], similarity: Callable[[int, int], float]
) -> dict[int, dict[int, tuple[Removal, str, float]]]:
    """Per file index: line -> (removal, keeper as 'file:line', similarity to the keeper)."""
    names = {t.index: t.path.name for t in tasks}
    out: dict[int, dict] = {t.index: {} for t in tasks}
    for gid, rem in sorted(removal.items()):
        index, line = split_gid(gid)
        k_index, k_line = split_gid(rem.keeper)
        out[index][line] = (rem, f"{names[k_index]}:{k_line}", similarity(gid, rem.keeper))
    return out


def run_local(tasks: list[FileTask], config: PipelineConfig) -> Stats:
    workers = cpu_workers(config.workers)
    run_tasks(signature_task, tasks, workers, desc="dedup: signatures")
    stats = Stats()
    removal = find_removals(tasks, config, stats)
    arrays = {t.index: _Arrays.load(_work_dir(t), t.index, config.dedup.perms) for t in tasks}
    drops = drop_lists(
        removal, tasks, lambda a, b: estimated_jaccard(_signature(arrays, a), _signature(arrays, b))
    )
    filters = [FilterTask(t.index, t.path, t.out, t.config, drops[t.index]) for t in tasks]
    stats += run_tasks(filter_file, filters, workers, desc="dedup: filter")
    shutil.rmtree(tasks[0].out / "_work", ignore_errors=True) if tasks else None
    return stats
