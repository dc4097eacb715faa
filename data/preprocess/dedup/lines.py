"""Line-level dedup: boilerplate lines (navigation, copyright, "source: ..." footers) shared by many
documents are cut out of the documents that dedup keeps.

A line is its normalized text (lower case, whitespace collapsed: `hashing.normalize`), hashed to 64
bits; lines shorter than `dedup.line_min_chars` are never cut (a lone ``}`` or "Introduction" is not
boilerplate). Each document counts a line once. Lines found in at least `dedup.line_min_docs`
documents of the channels in `dedup.line_channels` (empty: every channel) are cut; a document left
with no text is dropped as `dedup_lines`. Both engines count with the same hashes: the local engine
spreads the per-document hashes over `BUCKETS` files per task and counts one bucket at a time (memory:
8 bytes per distinct line and document of one bucket), Spark with a `reduceByKey`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..config import DedupConfig
from ..document import Document
from .hashing import normalize

BUCKETS = 16


def line_key(line: str, min_chars: int) -> int | None:
    """The signed 64-bit hash of a normalized line, or None for a line too short to count."""
    text = normalize(line)
    if len(text) < min_chars:
        return None
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def applies(d: DedupConfig, channel: str | None) -> bool:
    return d.line_min_docs > 0 and (not d.line_channels or (channel or "unlabelled") in d.line_channels)


def document_line_keys(doc: Document, d: DedupConfig) -> np.ndarray:
    """The distinct line hashes of one document (empty when line dedup does not apply to it)."""
    if not applies(d, doc.channel):
        return np.zeros(0, dtype=np.int64)
    keys = {line_key(line, d.line_min_chars) for line in doc.text.split("\n")}
    keys.discard(None)
    return np.asarray(sorted(keys), dtype=np.int64)


def write_buckets(work: Path, keys: list[np.ndarray]) -> None:
    """Append a chunk of documents' line hashes to `work/lines<b>.bin`, split by hash bucket."""
    flat = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    bucket = flat.view(np.uint64) % np.uint64(BUCKETS)
    for b in range(BUCKETS):
        with open(work / f"lines{b}.bin", "ab") as handle:
            handle.write(flat[bucket == b].tobytes())


def frequent_from_buckets(works: list[Path], min_docs: int) -> frozenset[int]:
    """The hashes found in at least `min_docs` documents, over every task's bucket files."""
    frequent: set[int] = set()
    for b in range(BUCKETS):
        parts = [
            np.fromfile(w / f"lines{b}.bin", dtype=np.int64) for w in works if (w / f"lines{b}.bin").exists()
        ]
        if not parts:
            continue
        values, counts = np.unique(np.concatenate(parts), return_counts=True)
        frequent.update(values[counts >= min_docs].tolist())
    return frozenset(frequent)


def strip_lines(doc: Document, d: DedupConfig, frequent: frozenset[int]) -> list[str]:
    """Cut the frequent lines out of `doc.text`; returns the lines cut."""
    if not frequent or not applies(d, doc.channel):
        return []
    kept, cut = [], []
    for line in doc.text.split("\n"):
        (cut if line_key(line, d.line_min_chars) in frequent else kept).append(line)
    if cut:
        doc.text = "\n".join(kept)
    return cut
