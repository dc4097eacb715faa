"""Pure dedup logic shared by the local and Spark engines: buckets to edges, clusters, keepers.

A document is named by its *gid*, ``file_index << 32 | line_number``: both engines read the same
files in the same order with the same reader, so gids agree, and ties always break the same way.
Within a bucket (one band key, or one exact hash) the edges run from the smallest gid to every
other member; edges that fail verification are dropped; the connected components of what is left
are the duplicate clusters, and each keeps exactly one document.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

LINE_BITS = 32


def make_gid(file_index: int, line: int) -> int:
    return (file_index << LINE_BITS) | line


def split_gid(gid: int) -> tuple[int, int]:
    return gid >> LINE_BITS, gid & ((1 << LINE_BITS) - 1)


def bucket_edges(keys: np.ndarray, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star edges (first gid of a bucket -> each other member) for every key shared by 2+ gids."""
    if keys.size < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    order = np.lexsort((gids, keys))
    k, g = keys[order], gids[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    bucket_of = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, k.size]))
    first = g[starts][bucket_of]
    mask = g != first
    return first[mask], g[mask]


def star_edges(members: Iterable[int]) -> list[tuple[int, int]]:
    """The same edges for one bucket given as a list (the Spark engine's groupByKey output)."""
    ordered = sorted(set(members))
    return [(ordered[0], other) for other in ordered[1:]]


class UnionFind:
    """Union-find over the gids that appear in edges only (memory follows the duplicates)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
            self.parent.setdefault(min(ra, rb), min(ra, rb))

    def clusters(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for x in self.parent:
            out.setdefault(self.find(x), []).append(x)
        return {root: sorted(members) for root, members in out.items() if len(members) > 1}


@dataclass(frozen=True)
class DocInfo:
    """What keeper selection needs to know about a document in a cluster."""

    length: int
    quality: float  # NaN when the document has no score
    exact: int


def rank(info: DocInfo, gid: int, keep: str) -> tuple:
    """Larger is better: quality (if kept by quality), then length, then the earliest gid."""
    quality = -math.inf if math.isnan(info.quality) else info.quality
    if keep == "quality":
        return (quality, info.length, -gid)
    return (info.length, -gid)


@dataclass(frozen=True)
class Removal:
    keeper: int
    rule: str  # "dedup_exact" or "dedup_near"


def removals(clusters: dict[int, list[int]], infos: dict[int, DocInfo], keep: str) -> dict[int, Removal]:
    """For every cluster, keep its best member and mark the others, saying whether each is exact."""
    out: dict[int, Removal] = {}
    for members in clusters.values():
        keeper = max(members, key=lambda gid: rank(infos[gid], gid, keep))
        for gid in members:
            if gid != keeper:
                exact = infos[gid].exact == infos[keeper].exact
                out[gid] = Removal(keeper, "dedup_exact" if exact else "dedup_near")
    return out
