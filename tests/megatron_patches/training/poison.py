"""A copy of a channel whose tokens are bad in a known window of the run's blended sample ids.

The trainer's own dataset builder (``training.data.build_phase_datasets``) maps each sample
id of the window to the token spans it reads; the copy replaces exactly those tokens
(EOD kept, so every length and therefore every index of the blend stays the same):
``rise`` with random tokens, ``drop`` with one token repeated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_patches.training.config import DataConfig
from megatron_patches.training.data import DatasetTokenizer, Phase, build_phase_datasets
from tests.megatron_patches.training.corpus import EOD


def write_skewed_corpus(directory: Path, name: str, docs: int, seed: int) -> str:
    """Documents of random tokens ``1..32``, half of them token 7: a tiny model learns the
    distribution in a few iterations (loss ~2.4), random tokens from the whole vocabulary
    then cost far more and a run of 7s far less."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    directory.mkdir(parents=True, exist_ok=True)
    prefix = str(directory / f"{name}_text_document")
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(docs):
        length = int(rng.integers(20, 120))
        tokens = np.where(rng.random(length) < 0.5, 7, rng.integers(1, 33, length))
        builder.add_item(torch.from_numpy(np.append(tokens, EOD).astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def poisoned_copy(
    data: list, channel: int, window: tuple[int, int], kind: str, root: Path, vocab: int, seed: int = 1234
) -> list:
    """``data`` (a two-channel blend) with channel ``channel`` replaced by a copy poisoned in ``window``."""
    phase = Phase("main", 0, 1, tuple(data), 32, 8, 2)
    tokenizer = DatasetTokenizer(EOD, vocab)
    train, _ = build_phase_datasets(
        phase, 400, 8, "95,5,0", seed, tokenizer, str(root / "cache"), DataConfig()
    )
    spans = [
        span
        for i in range(window[0], window[1] + 1)
        if train.dataset_index[i] == channel
        for span in _token_spans(train.datasets[channel], int(train.dataset_sample_index[i]))
    ]
    assert spans, "the window holds no sample of that channel"
    prefix = data[2 * channel + 1]
    bad = str(root / f"{Path(prefix).name.removesuffix('_text_document')}_poisoned_text_document")
    _write_poisoned(prefix, bad, spans, kind, vocab)
    poisoned = list(data)
    poisoned[2 * channel + 1] = bad
    return poisoned


def _token_spans(dataset, index: int) -> list[tuple[int, int, int]]:
    """``(document, first token, end token)`` that ``GPTDataset[index]`` reads (Megatron-Core 0.16)."""
    k = int(dataset.shuffle_index[index])
    (beg, beg_offset), (end, end_offset) = dataset.sample_index[k], dataset.sample_index[k + 1]
    spans = []
    for position in range(int(beg), int(end) + 1):
        doc = int(dataset.document_index[position])
        first = int(beg_offset) if position == beg else 0
        last = int(end_offset) + 1 if position == end else None
        spans.append((doc, first, last))
    return spans


def _write_poisoned(prefix: str, out: str, spans: list, kind: str, vocab: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    source = IndexedDataset(prefix)
    docs = [np.array(source[i], dtype=np.int64) for i in range(len(source))]
    rng = np.random.default_rng(0)
    for doc, first, last in spans:
        tokens = docs[doc]
        stop = len(tokens) if last is None else min(last, len(tokens))
        keep = tokens[first:stop] == EOD
        new = rng.integers(1, vocab, stop - first) if kind == "rise" else np.full(stop - first, 7)
        tokens[first:stop] = np.where(keep, EOD, new)
    builder = IndexedDatasetBuilder(out + ".bin", dtype=np.uint16)
    for tokens in docs:
        builder.add_item(torch.from_numpy(tokens))
        builder.end_document()
    builder.finalize(out + ".idx")
