"""drop-used: the next blend without the documents a run's usage counts say were read K times or more."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from data.preprocess.cli import main
from data.preprocess.tokenize import run_tokenize
from megatron_patches.errors import ConfigError
from megatron_patches.formats.usage import write_usage

from .conftest import config_for, mixed_docs, write_jsonl

CHANNELS = ("zh_web", "en_web", "code")


def _documents(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def _digest(directory: Path) -> str:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("drop_used")
    docs = mixed_docs(3, 30)
    for i, doc in enumerate(docs):
        doc["channel"] = CHANNELS[i % 3]
    run_tokenize(config_for(None), [write_jsonl(root / "in.jsonl", docs)], root / "data", tokenizer_dir)
    return root / "data"


def test_documents_used_max_uses_times_or_more_are_dropped_in_order(tokenized, tmp_path):
    prefixes = {c: tokenized / f"{c}_text_document" for c in ("zh_web", "en_web")}  # code: never read
    source = {c: _documents(tokenized / f"{c}_text_document") for c in CHANNELS}
    counts = {str(p): np.arange(len(source[c])) % 4 for c, p in prefixes.items()}  # 0, 1, 2, 3, 0, ...
    write_usage(tmp_path / "iter_0000010", counts, {str(p): c for c, p in prefixes.items()}, 10)
    before = _digest(tokenized)
    args = ["drop-used", "--tokenized", str(tokenized), "--usage", str(tmp_path / "iter_0000010" / "usage")]
    assert main([*args, "--max-uses", "2", "--out", str(tmp_path / "next")]) == 0
    for channel in CHANNELS:
        kept = _documents(tmp_path / "next" / f"{channel}_text_document")
        uses = counts.get(str(prefixes.get(channel)), np.zeros(len(source[channel])))
        assert kept == [doc for doc, n in zip(source[channel], uses, strict=True) if n < 2], channel
    old, new = (yaml.safe_load((d / "blend.yaml").read_text()) for d in (tokenized, tmp_path / "next"))
    assert new["weights"] == old["weights"]  # the source's mix, over fewer documents
    assert new["documents"]["zh_web"] == sum(1 for n in counts[str(prefixes["zh_web"])] if n < 2)
    assert _digest(tokenized) == before  # the input is never touched


def test_counts_from_another_tokenize_output_are_refused_in_one_line(tokenized, tmp_path):
    prefix = str(tokenized / "zh_web_text_document")
    write_usage(tmp_path / "ckpt", {prefix: np.zeros(3, dtype=np.int64)}, {prefix: "zh_web"}, 10)
    args = ["drop-used", "--tokenized", str(tokenized), "--usage", str(tmp_path / "ckpt"), "--max-uses", "1"]
    with pytest.raises(
        ConfigError, match=r"^drop-used: the usage counts of channel zh_web cover 3 documents"
    ):
        main([*args, "--out", str(tmp_path / "next")])
    assert not (tmp_path / "next").exists()
