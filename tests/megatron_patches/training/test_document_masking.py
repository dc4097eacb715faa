"""data.reset_attention_mask trains (the document mask reaches the model) and data.shuffle_documents
false keeps the .bin's document order inside samples while samples stay shuffled."""

from pathlib import Path

import numpy as np

from megatron_patches.training.config import DataConfig
from megatron_patches.training.data import DatasetTokenizer, Phase, build_phase_datasets
from tests.dist import run_on_ranks
from tests.megatron_patches.training.corpus import EOD, write_corpus
from tests.megatron_patches.training.test_train import _train, losses, tiny_args

DOCS = 60


def _numbered_corpus(directory: Path) -> str:
    """Document i is the token i + 1 repeated (5 to 12 times), then EOD."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    directory.mkdir(parents=True, exist_ok=True)
    prefix = str(directory / "numbered_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i in range(DOCS):
        builder.add_item(torch.tensor([i + 1] * (5 + i % 8) + [EOD]))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def _document_sequences(tmp: str, shuffle_documents: bool) -> list[list[int]]:
    """The documents each of the first 40 training samples reads, in order."""
    prefix = _numbered_corpus(Path(tmp) / "data")
    phase = Phase("main", 0, 10, (prefix,), 32, 8, 2)
    data_cfg = DataConfig(shuffle_documents=shuffle_documents)
    train, _ = build_phase_datasets(
        phase, 40, 8, "90,10,0", 1234, DatasetTokenizer(EOD, 256), f"{tmp}/cache", data_cfg
    )
    out = []
    for i in range(40):
        tokens = train[i]["tokens"].numpy()
        ids = tokens[tokens != EOD]
        out.append([int(t) for k, t in enumerate(ids) if k == 0 or t != ids[k - 1]])
    return out


def _in_file_order(step: tuple[int, int]) -> bool:
    previous, following = step
    return following in (previous + 1, 1)  # the next document, or the first one: a new epoch


def test_documents_stay_in_file_order_inside_samples_and_samples_stay_shuffled(tmp_path):
    (ordered,) = run_on_ranks(_document_sequences, 1, str(tmp_path / "ordered"), False)
    (shuffled,) = run_on_ranks(_document_sequences, 1, str(tmp_path / "shuffled"), True)

    def steps(samples):
        return [(docs[k], docs[k + 1]) for docs in samples for k in range(len(docs) - 1)]

    assert steps(ordered) and all(_in_file_order(step) for step in steps(ordered))
    assert sum(map(_in_file_order, steps(shuffled))) < len(steps(shuffled)) / 4  # Megatron's default
    firsts = [docs[0] for docs in ordered]
    assert firsts != sorted(firsts)  # the sample order is still shuffled


def test_tiny_run_with_document_masking_trains_and_the_mask_changes_the_loss(tmp_path):
    prefix = write_corpus(tmp_path / "data", "zh", 60, 128, seed=1, period=3)
    common = ("train.train_iters=5", "checkpoint.save_interval=100", "data.reset_position_ids=true")
    masked = tiny_args(tmp_path / "masked", [prefix], *common, "data.reset_attention_mask=true")
    plain = tiny_args(tmp_path / "plain", [prefix], *common)
    assert run_on_ranks(_train, 1, masked, timeout=600) == [0]
    assert run_on_ranks(_train, 1, plain, timeout=600) == [0]
    with_mask, without = losses(tmp_path / "masked"), losses(tmp_path / "plain")
    assert set(with_mask) == set(without) and all(np.isfinite(v) for v in with_mask.values())
    assert with_mask != without  # the same data and seed: only the document mask differs
