"""label: channels from source rules and content; plug-in scorers set the quality score."""

from __future__ import annotations

import json
import random

import pytest

from data.demo import synth
from data.preprocess.document import Document
from data.preprocess.label import LabelConfig, infer_channel, load_scorer
from data.preprocess.stage import run_file_stage
from data.preprocess.steps import label_file
from megatron_patches.errors import ConfigError

from .conftest import config_for, write_jsonl


def test_channel_from_source_rules_then_content():
    rng = random.Random(8)
    config = LabelConfig(sources={"github/*": "code", "arxiv*": "math"})
    cases = {
        "zh_web": Document(text=synth.zh_doc(rng), id="1"),
        "en_web": Document(text=synth.en_doc(rng), id="2"),
        "code": Document(text=synth.code_doc(rng, synth.stdlib_sources()), id="3"),
        "markdown": Document(text=synth.markdown_doc(rng), id="4"),
        "math": Document(text=synth.math_doc(rng), id="5"),
    }
    for channel, doc in cases.items():
        assert infer_channel(doc, config) == channel
    prose_from_github = Document(text=synth.en_doc(rng), id="6", source="github/readme")
    assert infer_channel(prose_from_github, config) == "code"
    assert infer_channel(Document(text="...", id="7", channel="books"), config) == "books"
    assert infer_channel(Document(text="!!! ???", id="8"), config) == "other"


def test_label_stage_with_python_scorer(tmp_path):
    rng = random.Random(9)
    records = [{"id": f"d{i}", "text": synth.zh_doc(rng) if i % 2 else synth.en_doc(rng)} for i in range(20)]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    scorer = {"kind": "python", "path": "tests.data.preprocess.scorer_plugin:score"}
    report = run_file_stage(
        "label", config_for(tmp_path, **{"label.scorer": scorer}), [path], tmp_path / "out", False, label_file
    )
    out = [json.loads(line) for p in (tmp_path / "out").glob("part-*.jsonl") for line in p.open()]
    assert [r["id"] for r in out] == [r["id"] for r in records]
    assert all(r["quality"] == pytest.approx(min(1.0, len(r["text"]) / 1000)) for r in out)
    assert {r["channel"] for r in out} == {"zh_web", "en_web"}
    assert report["channel"]["zh_web"]["docs_out"] == 10 and report["scored"] == 20


def test_hf_classifier_scorer(tmp_path, tokenizer_dir):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=1024,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
        )
    )
    model.save_pretrained(tmp_path / "clf")
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp_path / "clf")
    score = load_scorer({"kind": "hf", "path": str(tmp_path / "clf"), "label": 1})
    texts = ["短文本", "a longer English text about data quality"]
    values = score(texts)
    assert len(values) == 2 and all(0.0 < v < 1.0 for v in values)
    assert values == pytest.approx(score(texts[::-1])[::-1], abs=1e-5)


def test_fasttext_scorer(tmp_path):
    fasttext = pytest.importorskip("fasttext")
    rng = random.Random(10)
    lines = []
    for _ in range(200):
        lines.append("__label__hq " + synth.en_doc(rng, 3).replace("\n", " "))
        lines.append("__label__lq " + " ".join(["buy cheap watches now"] * 5))
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    model = fasttext.train_supervised(str(tmp_path / "train.txt"), epoch=5, verbose=0, seed=1, thread=1)
    model.save_model(str(tmp_path / "quality.bin"))
    score = load_scorer({"kind": "fasttext", "path": str(tmp_path / "quality.bin"), "label": "__label__hq"})
    good, spam = score([synth.en_doc(rng, 3), "buy cheap watches now\nbuy cheap watches now"])
    assert good > 0.5 > spam


def test_bad_scorer_specs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_scorer({"kind": "fasttext", "path": str(tmp_path / "missing.bin")})
    with pytest.raises(ConfigError, match="module:function"):
        load_scorer({"kind": "python", "path": "no_such_module:f"})
    with pytest.raises(ConfigError, match="kind"):
        load_scorer({"kind": "svm", "path": str(tmp_path)})
