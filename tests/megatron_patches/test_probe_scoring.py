"""Probe files and the pure scoring math, checked against hand computations."""

import math

import pytest
import torch

from megatron_patches.errors import ConfigError
from megatron_patches.probe_scoring import (
    Probe,
    Row,
    load_probes,
    pack_rows,
    probe_rows,
    probe_scores,
    row_totals,
    token_logprobs,
)
from tests.tiny_hf import build_tokenizer

YAML_PROBES = """
- {name: capital_zh, prefix: "中国的首都是", target: "北京"}
- {name: fact_ppl, text: "water boils at one hundred degrees."}
- {name: paris_vs_tokyo, prefix: "the capital of france is", better: " paris.", worse: " tokyo."}
"""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_yaml_and_jsonl_files_give_the_same_probes(tmp_path):
    (tmp_path / "p.yaml").write_text(YAML_PROBES)
    (tmp_path / "p.jsonl").write_text(
        '{"name": "capital_zh", "prefix": "中国的首都是", "target": "北京"}\n\n'
        '{"name": "fact_ppl", "text": "water boils at one hundred degrees."}\n'
        '{"name": "paris_vs_tokyo", "prefix": "the capital of france is", '
        '"better": " paris.", "worse": " tokyo."}\n'
    )
    expected = [
        Probe("capital_zh", "target", "中国的首都是", ("北京",)),
        Probe("fact_ppl", "ppl", "", ("water boils at one hundred degrees.",)),
        Probe("paris_vs_tokyo", "margin", "the capital of france is", (" paris.", " tokyo.")),
    ]
    assert load_probes(tmp_path / "p.yaml") == expected
    assert load_probes(tmp_path / "p.jsonl") == expected
    (tmp_path / "p.jsonl").rename(tmp_path / "probes.txt")  # JSONL by content, whatever its name
    assert load_probes(tmp_path / "probes.txt") == expected


def test_the_shipped_example_probe_file_loads():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "launch" / "configs" / "probes.yaml"
    probes = load_probes(example)
    assert {p.kind for p in probes} == {"target", "ppl", "margin"}


def test_rows_start_from_eos_and_score_exactly_the_continuation(tokenizer):
    probes = [Probe("p", "target", "the capital of", (" china",)), Probe("t", "ppl", "", ("cats",))]
    rows = probe_rows(probes, tokenizer)
    eos = tokenizer.eos_token_id
    prefix = tokenizer.encode("the capital of", add_special_tokens=False)
    target = tokenizer.encode(" china", add_special_tokens=False)
    assert rows == [
        Row((eos, *prefix, *target), 1 + len(prefix)),
        Row((eos, *tokenizer.encode("cats", add_special_tokens=False)), 1),
    ]


def test_scores_match_a_hand_computation_from_logits():
    rows = [Row((7, 1, 2, 3), 2), Row((7, 4), 1), Row((7, 2, 2), 1), Row((7, 3), 1)]
    probes = [
        Probe("t", "target", "x", ("y",)),
        Probe("ppl", "ppl", "", ("z",)),
        Probe("m", "margin", "", ("a", "b")),
    ]
    batch = pack_rows(rows, pad_id=0, micro_batch_size=3)
    assert batch.tokens.shape == (6, 3) and batch.rows == 4
    torch.manual_seed(0)
    logits = torch.randn(6, 3, 10)  # 10 logits, of which the last 2 are vocabulary padding
    sums, counts = row_totals(token_logprobs(logits, batch.labels, vocab_size=8), batch.mask)
    scores = probe_scores(probes, sums[: batch.rows], counts[: batch.rows])

    def logp(row, position, token):
        return torch.log_softmax(logits[row, position, :8].double(), -1)[token].item()

    assert scores["t"] == pytest.approx(logp(0, 1, 2) + logp(0, 2, 3), abs=1e-6)
    assert scores["ppl"] == pytest.approx(math.exp(-logp(1, 0, 4)), rel=1e-6)
    margin = logp(2, 0, 2) + logp(2, 1, 2) - logp(3, 0, 3)
    assert scores["m"] == pytest.approx(margin, abs=1e-6)
    assert counts.tolist() == [2, 1, 2, 1, 0, 0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- {name: a, prefix: x}\n", "entry 1 (a) has keys ['prefix']; a probe is one of"),
        ("- {prefix: x, target: y}\n", "entry 1 needs a non-empty 'name'"),
        ("- {name: a, text: x}\n- {name: a, text: y}\n", "duplicate probe names ['a']"),
        ("- {name: a, text: 3}\n", "(a): ['text'] must be strings"),
        ("name: a\n", "must hold a list of probes"),
        ("", "has no probes"),
    ],
)
def test_malformed_probe_files_are_named(tmp_path, content, message):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_probes(path)
    assert message in str(err.value)


def test_a_target_that_tokenizes_to_nothing_is_refused(tokenizer):
    with pytest.raises(ConfigError, match="probe 'empty': '' tokenizes to nothing"):
        probe_rows([Probe("empty", "target", "the capital", ("",))], tokenizer)
