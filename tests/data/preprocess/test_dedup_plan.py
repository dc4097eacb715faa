"""`dedup-plan`: each threshold's row is what `dedup` at that threshold keeps, tokens as tokenize counts."""

from __future__ import annotations

import json

import pytest

from data.preprocess.cli import main
from data.preprocess.dedup import run_dedup
from data.preprocess.dedup.plan import plan_dedup
from data.preprocess.tokenize import run_tokenize
from megatron_patches.errors import ConfigError

from .conftest import config_for
from .test_dedup import channel_corpus


def test_plan_rows_equal_what_dedup_and_tokenize_keep_at_each_threshold(tmp_path, tokenizer_dir):
    (tmp_path / "in").mkdir()
    inputs = channel_corpus(tmp_path / "in")
    rows = plan_dedup(config_for(tmp_path), inputs, tmp_path / "plan", [0.9, 0.7], tokenizer_dir)
    by_key = {(r.channel, r.threshold): r for r in rows}
    assert [r.threshold for r in rows[:3]] == [0.7] * 3  # sorted; news, wiki, all
    for threshold in (0.7, 0.9):
        config = config_for(tmp_path, **{"dedup.threshold": threshold})
        deduped = run_dedup(config, inputs, tmp_path / f"dedup{threshold}")
        outputs = sorted((tmp_path / f"dedup{threshold}").glob("part-*.jsonl"))
        tokenized = run_tokenize(config, outputs, tmp_path / f"tok{threshold}", tokenizer_dir)
        for channel in ("news", "wiki"):
            row = by_key[(channel, threshold)]
            assert row.docs_kept == deduped["channel"][channel]["docs_out"]
            assert row.docs == deduped["channel"][channel]["docs_in"] == 55
            assert row.tokens_kept == tokenized["channel"][channel]["tokens"]
    assert by_key[("news", 0.7)].docs_kept <= 42 < by_key[("news", 0.9)].docs_kept
    everything = by_key[("all", 0.9)]
    assert everything.docs == 110 and everything.tokens >= everything.tokens_kept
    saved = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert len(saved["rows"]) == 6 and "plus EOD" in saved["tokens"]
    assert not (tmp_path / "plan" / "_work").exists()


def test_cli_prints_the_threshold_table(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    inputs = [str(p) for p in channel_corpus(tmp_path / "in")]
    args = ["dedup-plan", "--input", *inputs, "--out", str(tmp_path / "plan"), "--workers", "1"]
    assert main([*args, "--thresholds", "0.7,0.85"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["channel", "threshold"]
    assert [line.split()[:2] for line in table[1:7]] == [
        [channel, threshold] for threshold in ("0.70", "0.85") for channel in ("news", "wiki", "all")
    ]
    assert "/ 55 (" in table[1] and "UTF-8 bytes / 4" in table[7]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0.7,high", "--thresholds expects comma-separated numbers"),
        ("0,0.8", r"thresholds must be .* \(0, 1\]"),
    ],
)
def test_bad_thresholds_are_one_error(tmp_path, value, message):
    (tmp_path / "in").mkdir()
    inputs = [str(p) for p in channel_corpus(tmp_path / "in", per_channel=4, planted=1)]
    with pytest.raises(ConfigError, match=message):
        main(["dedup-plan", "--input", *inputs, "--out", str(tmp_path / "p"), "--thresholds", value])
    assert not (tmp_path / "p").exists()
