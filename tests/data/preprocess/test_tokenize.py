"""tokenize: .bin/.idx that Megatron-Core reads back id for id, byte-identical to its own builder."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import yaml

from data.preprocess.blend import blend_weights
from data.preprocess.indexed import PartWriter, merge_parts
from data.preprocess.tokenize import run_tokenize
from megatron_patches.errors import ConfigError
from megatron_patches.formats.blend import load_blend
from tests.dist import run_on_ranks

from .conftest import config_for, mixed_docs, write_jsonl

CHANNELS = ("zh_web", "en_web", "code")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    docs = mixed_docs(31, 150)
    for i, doc in enumerate(docs):
        doc["channel"] = CHANNELS[0] if i % 5 < 2 else CHANNELS[1] if i % 5 < 4 else CHANNELS[2]
    docs[3]["text"] = ""  # an empty document still gets its EOD
    files = [write_jsonl(root / f"part-{k}.jsonl", docs[k * 50 : (k + 1) * 50]) for k in range(3)]
    return files, docs


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, labelled, tokenizer_dir):
    out = tmp_path_factory.mktemp("tokenized") / "data"
    config = config_for(None, workers=2, **{"blend.ratios": {"zh_web": 4, "en_web": 4, "code": 2}})
    run_tokenize(config, labelled[0], out, tokenizer_dir)
    return out


def test_indexed_dataset_reads_back_the_tokenizer_ids(tokenized, labelled, tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    for channel in CHANNELS:
        texts = [d["text"] for d in labelled[1] if d["channel"] == channel]
        dataset = IndexedDataset(str(tokenized / f"{channel}_text_document"))
        assert len(dataset) == len(texts) and dataset.document_indices.tolist() == list(range(len(texts) + 1))
        for i, text in enumerate(texts):
            assert dataset[i].tolist() == sp.encode(text) + [sp.eos_id()]
        assert dataset[0].dtype == np.uint16


def test_a_one_worker_run_loads_the_tokenizer_once(tmp_path, labelled, tokenizer_dir, monkeypatch):
    """The stage loads the tokenizer to validate it; the task run in the same process reuses it."""
    from data.preprocess import tokenize

    loads, load = [], tokenize.load_encoder
    monkeypatch.setattr(tokenize, "load_encoder", lambda path: loads.append(path) or load(path))
    monkeypatch.setattr(tokenize, "_encoders", {})
    run_tokenize(config_for(None, workers=1), labelled[0][:1], tmp_path / "data", tokenizer_dir)
    assert loads == [tokenizer_dir]


def test_bytes_equal_megatron_builder(tmp_path, tokenized, labelled, tokenizer_dir):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    texts = [d["text"] for d in labelled[1] if d["channel"] == "en_web"]
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for text in texts:
        builder.add_item(torch.tensor(sp.encode(text) + [2]))
        builder.end_document()
    builder.finalize(str(tmp_path / "ref.idx"))
    for suffix in (".bin", ".idx"):
        assert (tokenized / f"en_web_text_document{suffix}").read_bytes() == (
            tmp_path / f"ref{suffix}"
        ).read_bytes()


def test_merge_of_many_parts_and_int32_tokens(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100_000, rng.integers(0, 50)).tolist() for _ in range(30)]
    stems = []
    for k in range(3):
        writer = PartWriter(tmp_path / f"p{k}", np.dtype(np.int32))
        writer.add([np.asarray(d, np.int32).tobytes() for d in docs[k * 10 : (k + 1) * 10]])
        writer.close()
        stems.append(tmp_path / f"p{k}")
    assert merge_parts(stems, tmp_path / "all", np.dtype(np.int32)) == (30, sum(map(len, docs)))
    dataset = IndexedDataset(str(tmp_path / "all"))
    assert [dataset[i].tolist() for i in range(30)] == docs


def test_part_writer_ends_every_packed_document_with_the_suffix(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    writer = PartWriter(tmp_path / "p", np.dtype(np.uint16))
    eod = np.asarray([2], np.uint16).tobytes()
    assert writer.add([np.asarray(d, np.uint16).tobytes() for d in ([5, 6], [], [7])], eod) == 6
    assert writer.add([], eod) == 0
    with pytest.raises(ValueError, match="whole number"):
        writer.add([b"\x01"])  # half a uint16
    writer.close()
    assert merge_parts([tmp_path / "p"], tmp_path / "all", np.dtype(np.uint16)) == (3, 6)
    dataset = IndexedDataset(str(tmp_path / "all"))
    assert [dataset[i].tolist() for i in range(3)] == [[5, 6, 2], [2], [7, 2]]


def test_blend_yaml_and_data_path(tokenized, tokenizer_dir):
    raw = yaml.safe_load((tokenized / "blend.yaml").read_text())
    assert raw["data_path"] == [
        0.2,
        "code_text_document",
        0.4,
        "en_web_text_document",
        0.4,
        "zh_web_text_document",
    ]
    assert raw["channels"] == {c: f"{c}_text_document" for c in sorted(CHANNELS)}
    assert raw["eod_id"] == 2 and raw["vocab_size"] == 1024 and raw["dtype"] == "uint16"
    assert set(raw["tokens"]) == set(CHANNELS) and sum(raw["documents"].values()) == 150
    blend = load_blend(tokenized / "blend.yaml")
    assert blend["tokenizer"] == str(tokenizer_dir.resolve())
    for prefix in blend["channels"].values():
        assert (tokenized / f"{prefix}.idx").exists() and (tokenized / f"{prefix}.bin").exists()
    line = (tokenized / "data_path.txt").read_text().split()
    assert line[0] == "0.2" and line[1] == str(tokenized.resolve() / "code_text_document")


def test_blend_weights_rules():
    tokens = {"zh_web": 10, "en_web": 30, "code": 0}
    assert blend_weights(tokens, None) == {"en_web": 0.75, "zh_web": 0.25}
    assert blend_weights(tokens, {"zh_web": 1, "en_web": 1, "math": 0}) == {"en_web": 0.5, "zh_web": 0.5}
    with pytest.raises(ConfigError, match="no ratio"):
        blend_weights(tokens, {"zh_web": 1})
    with pytest.raises(ConfigError, match="no document"):
        blend_weights(tokens, {"zh_web": 1, "en_web": 1, "math": 2})


def build_blended_gpt_dataset(blend_yaml: str, cache: str) -> list:
    """On a gloo rank (BlendedDataset needs torch.distributed): the first samples' tokens."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    blend = load_blend(Path(blend_yaml))
    tokenizer = types.SimpleNamespace(
        eod=blend["eod_id"], pad=3, vocab_size=blend["vocab_size"], unique_identifiers={}
    )
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=64,
        blend=get_blend_from_list([str(x) for x in blend["data_path"]]),
        split="100,0,0",
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=cache,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [200, 0, 0], lambda: True, config).build()
    return [len(train), [train[i]["tokens"].tolist() for i in range(4)]]


def test_megatron_blended_gpt_dataset_builds_from_the_blend(tokenized, tmp_path):
    [(length, samples)] = run_on_ranks(
        build_blended_gpt_dataset, 1, str(tokenized / "blend.yaml"), str(tmp_path)
    )
    assert length >= 200
    assert all(len(tokens) == 64 and max(tokens) < 1024 for tokens in samples)
