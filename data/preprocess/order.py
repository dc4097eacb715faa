"""Document order inside a tokenized channel: in-context pretraining (`icp`) or near-duplicates
spread apart (`spread`), applied to a finished `<channel>_text_document.{bin,idx}`.

Both orders work on MinHash signatures of each document's token 3-grams (`dedup.hashing`, 64
permutations), computed from the `.bin` itself, so they depend only on the merged bytes and not
on how the input was split among workers. Neighbours are LSH candidates (32 bands x 2 rows: a pair
with Jaccard 0.2 is a candidate with probability ~0.7) scored by their estimated Jaccard.

* ``icp`` (Shi et al. 2023, arXiv 2310.10638): start at the first document, then repeatedly go to
  the most similar unvisited neighbour; with none left, continue at the first unvisited document.
  Megatron packs consecutive documents into a sample, so a sample holds related documents.
* ``spread``: near-duplicate clusters (candidate pairs at or above the channel's dedup threshold,
  estimated) have their members placed evenly across the block, `block / cluster size` apart;
  everything else keeps its relative order.

Memory is bounded by working in blocks of `tokenize.order_block_docs` consecutive documents
(signatures 256 bytes per document, plus at most 8 candidate pairs per document and band); the
order never moves a document out of its block. The rewritten files replace the originals only
once complete (written beside them, then renamed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_patches.formats.indexed import HEADER_SIZE, check_prefix

from .dedup.hashing import MinHasher, band_keys, exact_jaccard, ngram_hashes
from .dedup.lsh import UnionFind
from .indexed import PartWriter, merge_parts

NGRAM, PERMS, BANDS, ROWS = 3, 64, 32, 2
WINDOW = 8  # candidate pairs per document and band: a huge bucket is a common n-gram, not a topic
_PAIR_CHUNK = 1 << 16


def document_tokens(prefix: Path, dtype: np.dtype) -> tuple[np.memmap, np.ndarray]:
    """(all tokens, start offset of each document plus the end), memory-mapped."""
    count = check_prefix(str(prefix))
    lengths = np.memmap(f"{prefix}.idx", dtype=np.int32, mode="r", offset=HEADER_SIZE, shape=(count,))
    starts = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    size = int(starts[-1])
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r", shape=(size,)) if size else np.zeros(0, dtype)
    return tokens, starts


def signatures(tokens: np.ndarray, starts: np.ndarray, first: int, end: int, seed: int = 1) -> np.ndarray:
    """(end - first, PERMS) MinHash signatures of the token 3-grams of documents first..end-1."""
    hasher = MinHasher(num_perm=PERMS, ngram=NGRAM, seed=seed)
    out = np.empty((end - first, PERMS), dtype=np.uint32)
    for row, doc in enumerate(range(first, end)):
        ids = np.asarray(tokens[starts[doc] : starts[doc + 1]], dtype=np.uint64)
        out[row] = hasher.signature_of_shingles(ngram_hashes(ids, NGRAM))
    return out


def neighbour_pairs(sig: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, estimated Jaccard) for the LSH candidate pairs a < b of a block, each once."""
    n = sig.shape[0]
    if n < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    keys, index = band_keys(sig, BANDS, ROWS), np.arange(n, dtype=np.int64)
    codes = []
    for j in range(BANDS):
        by_key = np.lexsort((index, keys[:, j]))
        k = keys[by_key, j]
        for step in range(1, min(WINDOW, n - 1) + 1):
            same = k[step:] == k[:-step]
            a, b = by_key[:-step][same], by_key[step:][same]
            codes.append(np.minimum(a, b) * n + np.maximum(a, b))
    unique = np.unique(np.concatenate(codes))
    a, b = unique // n, unique % n
    similarity = np.concatenate(
        [
            (sig[a[s : s + _PAIR_CHUNK]] == sig[b[s : s + _PAIR_CHUNK]]).mean(axis=1)
            for s in range(0, a.size, _PAIR_CHUNK)
        ]
        or [np.zeros(0)]
    )
    return a, b, similarity


def icp_order(sig: np.ndarray) -> np.ndarray:
    """The nearest-unvisited-neighbour chain through a block (a permutation of its rows)."""
    n = sig.shape[0]
    a, b, similarity = neighbour_pairs(sig)
    source, target = np.concatenate([a, b]), np.concatenate([b, a])
    ranked = np.lexsort((target, -np.concatenate([similarity, similarity]), source))
    neighbours = target[ranked].tolist()
    bounds = np.searchsorted(source[ranked], np.arange(n + 1)).tolist()
    visited = [False] * n
    order, cursor, next_unvisited, current = [], bounds[:-1], 0, 0
    for _ in range(n):
        visited[current] = True
        order.append(current)
        while cursor[current] < bounds[current + 1] and visited[neighbours[cursor[current]]]:
            cursor[current] += 1
        if cursor[current] < bounds[current + 1]:
            current = neighbours[cursor[current]]
            continue
        while next_unvisited < n and visited[next_unvisited]:
            next_unvisited += 1
        current = next_unvisited
    return np.asarray(order, dtype=np.int64)


def spread_order(sig: np.ndarray, threshold: float) -> np.ndarray:
    """Members of each near-duplicate cluster evenly spaced over the block; others stay in order."""
    n = sig.shape[0]
    a, b, similarity = neighbour_pairs(sig)
    uf = UnionFind()
    close = similarity >= threshold
    for left, right in zip(a[close].tolist(), b[close].tolist(), strict=True):
        uf.union(left, right)
    position = np.arange(n, dtype=np.float64) / max(n, 1)  # a singleton keeps its place
    for members in uf.clusters().values():
        first = members[0] / n
        for rank, member in enumerate(members):
            position[member] = (rank + first) / len(members)
    return np.lexsort((np.arange(n), position))


def block_order(prefix: Path, dtype: np.dtype, kind: str, block_docs: int, threshold: float) -> np.ndarray:
    """The permutation of a whole channel, block by block."""
    tokens, starts = document_tokens(prefix, dtype)
    count = starts.size - 1
    parts = []
    for first in range(0, count, block_docs):
        end = min(count, first + block_docs)
        sig = signatures(tokens, starts, first, end)
        local = icp_order(sig) if kind == "icp" else spread_order(sig, threshold)
        parts.append(local + first)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def rewrite_in_order(prefix: Path, dtype: np.dtype, order: np.ndarray) -> None:
    """Rewrite `<prefix>.bin/.idx` with its documents in `order` (written aside, then renamed)."""
    tokens, starts = document_tokens(prefix, dtype)
    stem = Path(f"{prefix}.reordered")
    writer = PartWriter(stem, dtype)
    try:
        for s in range(0, order.size, 1024):
            docs = order[s : s + 1024].tolist()
            writer.add([np.asarray(tokens[starts[d] : starts[d + 1]]).tobytes() for d in docs])
    finally:
        writer.close()
    del tokens  # the memory map must close before the files it maps are replaced
    merge_parts([stem], prefix, dtype)
    for suffix in (".bin", ".len"):
        Path(f"{stem}{suffix}").unlink()


def adjacent_jaccard(prefix: Path, dtype: np.dtype, ngram: int = NGRAM) -> float:
    """Mean exact Jaccard similarity of the token n-gram sets of consecutive documents."""
    tokens, starts = document_tokens(prefix, dtype)
    total, previous = 0.0, None
    for doc in range(starts.size - 1):
        shingles = np.unique(
            ngram_hashes(np.asarray(tokens[starts[doc] : starts[doc + 1]], np.uint64), ngram)
        )
        if previous is not None:
            total += exact_jaccard(previous, shingles)
        previous = shingles
    pairs = starts.size - 2
    return total / pairs if pairs > 0 else 0.0


def reorder_channel(prefix: Path, dtype: np.dtype, kind: str, block_docs: int, threshold: float) -> dict:
    """Apply `kind` to one channel's dataset; returns the adjacent-document Jaccard before and after."""
    before = adjacent_jaccard(prefix, dtype)
    rewrite_in_order(prefix, dtype, block_order(prefix, dtype, kind, block_docs, threshold))
    return {
        "adjacent_jaccard_input": round(before, 4),
        f"adjacent_jaccard_{kind}": round(adjacent_jaccard(prefix, dtype), 4),
    }
