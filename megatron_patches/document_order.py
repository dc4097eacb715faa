"""Keep the documents of a ``.bin`` in file order inside samples, while samples stay shuffled.

Megatron-Core's ``GPTDataset`` shuffles the document index before it packs documents into samples
(``gpt_dataset._build_document_index``), then shuffles the samples. An in-context-pretraining order
(``python -m data.preprocess tokenize`` with ``tokenize.order: icp``) puts related documents next to
each other in the file, which the first shuffle would undo. With ``data.shuffle_documents: false``
the trainer builds its datasets inside :func:`documents_in_file_order`: the document index is
every exposed document in file order, once per epoch, and the sample shuffle (seeded as always)
still decides which sample a step reads. Megatron caches indices per config, not per this choice,
so the trainer gives such datasets their own cache directory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy
from megatron.core.datasets import gpt_dataset

from megatron_patches.compat import require_signature

require_signature(
    gpt_dataset._build_document_index,
    ["documents", "num_epochs", "numpy_random_state", "separate_final_epoch"],
)


def _file_order_index(
    documents: numpy.ndarray,
    num_epochs: int,
    numpy_random_state: numpy.random.RandomState,
    separate_final_epoch: bool,
) -> numpy.ndarray:
    """Every document in file order, epoch after epoch (the same dtype Megatron's index has)."""
    return numpy.tile(numpy.asarray(documents, dtype=numpy.int32), num_epochs)


@contextlib.contextmanager
def documents_in_file_order(enabled: bool) -> Iterator[None]:
    """While active (and `enabled`), GPTDataset builds its document index without shuffling."""
    if not enabled:
        yield
        return
    original = gpt_dataset._build_document_index
    gpt_dataset._build_document_index = _file_order_index
    try:
        yield
    finally:
        gpt_dataset._build_document_index = original
