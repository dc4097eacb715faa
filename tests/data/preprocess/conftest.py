"""Small generated corpora and a small trained tokenizer, shared by the preprocess tests."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from data.demo import synth
from data.preprocess.config import load_config


def write_jsonl(path: Path, records: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def mixed_docs(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    files = synth.stdlib_sources()
    docs = []
    for i in range(n):
        kind = i % 5
        if kind < 2:
            text = synth.zh_doc(rng)
        elif kind < 4:
            text = synth.en_doc(rng)
        else:
            text = synth.code_doc(rng, files)
        docs.append({"id": f"d{seed}-{i}", "text": text})
    return docs


def config_for(tmp: Path | None, **overrides):
    """Defaults with one worker (fast in tests) and small shards, plus dotted overrides."""
    values = {"workers": 1, "shard_docs": 50}
    values.update(overrides)
    return load_config(None, values)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Three .jsonl.gz files of mixed zh / en / code documents."""
    root = tmp_path_factory.mktemp("corpus")
    docs = mixed_docs(7, 240)
    for k in range(3):
        write_jsonl(root / f"part{k}.jsonl.gz", docs[k::3])
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir) -> Path:
    """A 1024-token tokenizer trained on the shared corpus, with domain and forbidden tokens."""
    from data.preprocess.tokenizer.train import run_train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    (root / "domain.txt").write_text("<EMAIL>\n<tool_call>\nC++\n", encoding="utf-8")
    (root / "forbidden.txt").write_text("ing\n", encoding="utf-8")
    config = load_config(
        None,
        {
            "workers": 1,
            "tokenizer.vocab_size": 1000,
            "tokenizer.reserved_tokens": 40,
            "tokenizer.domain_tokens": str(root / "domain.txt"),
            "tokenizer.forbidden_tokens": str(root / "forbidden.txt"),
            "tokenizer.holdout_docs": 20,
        },
    )
    run_train_tokenizer(config, sorted(corpus_dir.glob("*.jsonl.gz")), root / "out")
    return root / "out"
