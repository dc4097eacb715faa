"""A channel's clean rules are configurable: their order, which of them run, and their thresholds."""

from __future__ import annotations

import json
import random

import pytest

from data.demo import synth
from data.preprocess.config import load_config
from data.preprocess.stage import run_file_stage
from data.preprocess.steps import clean_file
from megatron_patches.errors import ConfigError

from .conftest import config_for, write_jsonl

# Fails too_short (9 < 30 characters) and, later in the default order, symbol_ratio and alpha_ratio.
SHORT_SYMBOLS = "!!?? ## x"


def clean(tmp_path, name: str, **overrides) -> tuple[dict, dict[str, dict]]:
    """(report, {document id: its rejected record}) of the clean stage over a short junk document,
    a long symbol-heavy one and a good English one."""
    records = [
        {"id": "short", "text": SHORT_SYMBOLS},
        {"id": "symbols", "text": "Some words, then symbols: " + "{}[]<>|~^ " * 20},
        {"id": "good", "text": synth.en_doc(random.Random(3))},
    ]
    path = write_jsonl(tmp_path / f"{name}.jsonl", records)
    out = tmp_path / name
    report = run_file_stage("clean", config_for(tmp_path, **overrides), [path], out, False, clean_file)
    rejected = {}
    for part in (out / "rejected").glob("*.jsonl"):
        for line in part.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            assert part.name.startswith(record["rule"])  # rejected/<rule>.jsonl
            rejected[record["id"]] = record
    return report, rejected


def test_the_rule_order_and_the_rule_list_decide_which_rule_drops_a_document(tmp_path):
    _, default = clean(tmp_path, "default")
    assert {i: (r["rule"], r["value"]) for i, r in default.items()} == {
        "short": ("too_short", 9),
        "symbols": ("symbol_ratio", round(182 / 202, 4)),
    }
    report, reordered = clean(
        tmp_path, "reordered", **{"clean.rules": ["alpha_ratio", "symbol_ratio", "too_short"]}
    )
    assert {i: (r["rule"], r["value"]) for i, r in reordered.items()} == {
        # the first failing rule of the configured order is recorded
        "short": ("alpha_ratio", round(1 / 7, 4)),
        "symbols": ("alpha_ratio", round(20 / 202, 4)),
    }
    assert report["rejected"] == {"alpha_ratio": 2} and report["docs_out"] == 1
    # without the symbol and alpha rules, only the short document goes
    report, fewer = clean(tmp_path, "fewer", **{"clean.rules": ["too_short", "line_repetition"]})
    assert {i: r["rule"] for i, r in fewer.items()} == {"short": "too_short"}
    assert report["docs_out"] == 2


def test_a_channel_has_its_own_rule_list_beside_its_thresholds(tmp_path):
    channel = {"rules": ["symbol_ratio", "too_short"], "max_symbol_ratio": 0.2}
    _, rejected = clean(tmp_path, "channel", **{"clean.channels": {"en_web": channel}})
    assert rejected["short"]["rule"] == "symbol_ratio" and rejected["short"]["channel"] == "en_web"
    assert "good" not in rejected  # en_web's other thresholds are still the defaults


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"clean.rules": ["too_short", "too_shrt"]}, "clean.rules: unknown rule(s) ['too_shrt']; known: ["),
        (
            {"clean.rules": ["too_short", "too_short"]},
            "clean.rules: rule(s) ['too_short'] listed more than once",
        ),
        (
            {"clean.channels": {"code": {"rules": "too_short"}}},
            "clean.channels.code.rules must be a list of rule names, got 'too_short'",
        ),
        (
            {"clean.channels": {"code": {"rules": ["zh_ratio", "blocklst"]}}},
            "clean.channels.code.rules: unknown rule(s) ['blocklst']",
        ),
        (
            {"clean.thresholds": {"min_alpha_ratio": 1.5}},
            "clean.thresholds.min_alpha_ratio must be a fraction in [0, 1] (null: off), got 1.5",
        ),
        ({"clean.channels": {"zh_web": {"min_chars": -1}}}, "clean.channels.zh_web.min_chars must be >= 0"),
    ],
)
def test_unknown_rules_and_bad_thresholds_stop_the_config_load_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
