"""merge-tokenized: per-shard tokenize outputs merged equal byte for byte to tokenizing all shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from data.preprocess.cli import main
from data.preprocess.tokenize import run_tokenize
from megatron_patches.errors import ConfigError

from .conftest import config_for, mixed_docs, write_jsonl

CHANNELS = ("zh_web", "en_web", "code")
RATIOS = {"zh_web": 4, "en_web": 4, "code": 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer_dir) -> dict[str, Path | list[Path]]:
    """Three shards (the last with only zh_web documents and a malformed line): tokenized whole, and
    one by one then merged by the CLI, whose config's ratios weigh the merged blend."""
    root = tmp_path_factory.mktemp("merge")
    docs = mixed_docs(5, 50)
    for i, doc in enumerate(docs):
        doc["channel"] = CHANNELS[i % 3] if i < 40 else "zh_web"
    files = [write_jsonl(root / f"in{k}.jsonl", docs[k * 20 : (k + 1) * 20]) for k in range(3)]
    with open(files[2], "a", encoding="utf-8") as handle:
        handle.write('{"text": "not closed\n')
    config = config_for(None, **{"blend.ratios": RATIOS})
    run_tokenize(config, files, root / "whole" / "data", tokenizer_dir)
    parts = [root / f"shard{k}" for k in range(3)]
    for path, part in zip(files, parts, strict=True):  # no ratios: shard 2 lacks two channels
        run_tokenize(config_for(None), [path], part, tokenizer_dir)
    (root / "config.yaml").write_text(yaml.safe_dump({"blend": {"ratios": RATIOS}}))
    args = ["merge-tokenized", "--config", str(root / "config.yaml"), "--out", str(root / "merged" / "data")]
    assert main([*args, "--inputs", *map(str, parts)]) == 0
    return {
        "root": root,
        "whole": root / "whole" / "data",
        "merged": root / "merged" / "data",
        "parts": parts,
    }


def test_merged_shards_equal_tokenizing_them_together(shards):
    whole, merged = shards["whole"], shards["merged"]
    names = sorted(p.relative_to(whole).as_posix() for p in whole.rglob("*") if p.is_file())
    compared = [n for n in names if n not in ("report.json", "data_path.txt")]
    assert "rejected/malformed.jsonl" in compared and "code_text_document.idx" in compared
    assert sorted(p.relative_to(merged).as_posix() for p in merged.rglob("*") if p.is_file()) == names
    for name in compared:
        assert (merged / name).read_bytes() == (whole / name).read_bytes(), name
    reports = [json.loads((d / "report.json").read_text()) for d in (whole, merged)]
    for key in ("docs_in", "docs_out", "malformed_lines", "channel", "tokens", "blend"):
        assert reports[0][key] == reports[1][key], key


def test_shards_of_another_tokenizer_or_dtype_are_refused(shards, tokenizer_dir):
    root, parts = shards["root"], shards["parts"]
    other = root / "other_tokenizer"
    shutil.copytree(tokenizer_dir, other)
    (other / "tokenizer.model").write_bytes((other / "tokenizer.model").read_bytes() + b"\0")
    odd = root / "odd"
    shutil.copytree(parts[1], odd)
    blend = yaml.safe_load((odd / "blend.yaml").read_text())
    blend["tokenizer"] = str(other)
    (odd / "blend.yaml").write_text(yaml.safe_dump(blend))
    with pytest.raises(ConfigError, match="different files"):
        main(["merge-tokenized", "--inputs", str(parts[0]), str(odd), "--out", str(root / "bad")])
    blend["tokenizer"], blend["dtype"] = str(tokenizer_dir), "int32"
    (odd / "blend.yaml").write_text(yaml.safe_dump(blend))
    with pytest.raises(ConfigError, match="has dtype int32"):
        main(["merge-tokenized", "--inputs", str(parts[0]), str(odd), "--out", str(root / "bad")])
    assert not (root / "bad").exists()
