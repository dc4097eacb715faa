"""The tokenizer's training sample: gathered per task by any engine, merged in any order.

Both parts are chosen by a hash of the doc id, so the choice is deterministic and needs one pass:

* held out (for the compression report): per channel, the first `holdout_docs` documents in input
  order whose hash is below HOLDOUT_RATE;
* training text: of the other documents, the longest run in (hash, input position) order that fits
  in `budget` bytes (at least one document): a uniform sample whose memory is bounded by the budget.

A task keeps its own first `holdout_docs` per channel and its own longest run; :meth:`merge` gives what
one pass over both tasks' documents gives, whatever the order of merging (Spark's `treeReduce`).
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator

from ..document import Document

HOLDOUT_RATE = 0.05  # documents whose id hashes below this may be held out of training
MAX_SENTENCE_BYTES = 1 << 16  # SentencePiece skips longer "sentences"; longer documents are cut

Position = tuple[int, ...]  # a document's place in input order: (file, range, line in range)
Entry = tuple[Position, float, str, int]  # (position, hash, text, bytes)


def _unit(doc_id: str) -> float:
    digest = hashlib.blake2b(doc_id.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class TrainingSample:
    """Held-out documents per channel and the training text, of the documents added or merged."""

    def __init__(self, budget: int, holdout_docs: int):
        self.budget, self.holdout_docs = budget, holdout_docs
        self._held: dict[str, list[Entry]] = {}  # channel -> entries in input order
        # max-heap on (hash, position): entries are (negated key, entry)
        self._heap: list[tuple[tuple[float, Position], Entry]] = []
        self._bytes = self._arrivals = 0
        self._cutoff: tuple[float, Position] | None = None  # keys >= this are out of the training run

    def add(self, doc: Document, position: Position | None = None) -> None:
        if position is None:
            position, self._arrivals = (self._arrivals,), self._arrivals + 1
        entry = (position, _unit(doc.id), doc.text, doc.nbytes)
        held = self._held.get(doc.channel or "unlabelled", [])
        if entry[1] < HOLDOUT_RATE and len(held) < self.holdout_docs:
            self._held.setdefault(doc.channel or "unlabelled", held).append(entry)
            return
        self._offer(entry)

    def _offer(self, entry: Entry) -> None:
        key = (entry[1], entry[0])
        if self._cutoff is not None and key >= self._cutoff:
            return
        heapq.heappush(self._heap, ((-entry[1], tuple(-i for i in entry[0])), entry))
        self._bytes += entry[3]
        while self._bytes > self.budget and len(self._heap) > 1:
            _, dropped = heapq.heappop(self._heap)  # the largest key: the run ends before it
            self._bytes -= dropped[3]
            self._cutoff = (dropped[1], dropped[0])

    def merge(self, other: TrainingSample) -> TrainingSample:
        """This sample and `other`'s documents as one; returns self."""
        if other._cutoff is not None and (self._cutoff is None or other._cutoff < self._cutoff):
            self._cutoff = other._cutoff
            while self._heap and (self._heap[0][1][1], self._heap[0][1][0]) >= self._cutoff:
                self._bytes -= heapq.heappop(self._heap)[1][3]
        for channel, entries in other._held.items():
            merged = sorted(self._held.get(channel, []) + entries)
            self._held[channel] = merged[: self.holdout_docs]
            for entry in merged[self.holdout_docs :]:  # held by one task, but later than the first
                self._offer(entry)
        for _, entry in other._heap:
            self._offer(entry)
        return self

    @property
    def train_docs(self) -> int:
        return len(self._heap)

    @property
    def holdout(self) -> dict[str, list[str]]:
        return {channel: [entry[2] for entry in entries] for channel, entries in self._held.items()}

    @property
    def holdout_count(self) -> int:
        return sum(map(len, self._held.values()))

    def training_texts(self) -> list[str]:
        """The training documents in input order, cut into SentencePiece-sized pieces."""
        in_order = sorted(entry for _, entry in self._heap)
        return [piece for entry in in_order for piece in _chunks(entry[2])]


def _chunks(text: str) -> Iterator[str]:
    """Pieces of at most MAX_SENTENCE_BYTES bytes, cut at line ends where possible."""
    while len(text.encode("utf-8")) > MAX_SENTENCE_BYTES:
        cut = text.rfind("\n", 0, MAX_SENTENCE_BYTES // 4) + 1 or MAX_SENTENCE_BYTES // 4
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text
