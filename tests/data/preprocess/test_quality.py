"""Quality filtering: `train-scorer` (fastText), drops by score per channel, dedup keeps the best copy."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from data.demo import synth
from data.preprocess.cli import main
from data.preprocess.config import load_config
from data.preprocess.dedup import run_dedup
from data.preprocess.label_stage import run_label
from megatron_patches.errors import ConfigError

from .conftest import config_for, write_jsonl

pytest.importorskip("fasttext")

SPAM = (
    "click here",
    "buy now",
    "free shipping",
    "limited offer",
    "casino bonus",
    "subscribe today",
    "all rights reserved",
    "accept cookies",
    "login",
    "best price",
    "100% free",
    "call now",
)


def spam_doc(rng: random.Random) -> str:
    return "\n".join(" ".join(rng.choice(SPAM) for _ in range(rng.randint(3, 8))) for _ in range(6))


def good_and_spam(rng: random.Random, n: int, prefix: str) -> list[dict]:
    records = []
    for i in range(n):
        records.append({"id": f"{prefix}good{i}", "text": synth.en_doc(rng, 6)})
        records.append({"id": f"{prefix}spam{i}", "text": spam_doc(rng)})
    return records


def kept_ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for p in sorted(out.glob("part-*.jsonl")) for line in p.open()]


def rejected(out: Path, rule: str = "quality") -> list[dict]:
    path = out / "rejected" / f"{rule}.jsonl"
    return [json.loads(line) for line in path.open()] if path.exists() else []


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> Path:
    """A fastText scorer trained by the CLI on 80 clean English documents and 80 spam pages."""
    root = tmp_path_factory.mktemp("scorer")
    rng = random.Random(3)
    positive = write_jsonl(
        root / "good.jsonl", [{"id": f"g{i}", "text": synth.en_doc(rng, 6)} for i in range(80)]
    )
    negative = write_jsonl(root / "bad.jsonl", [{"id": f"b{i}", "text": spam_doc(rng)} for i in range(80)])
    (root / "c.yaml").write_text("train_scorer: {dim: 16, bucket: 20000}\n")  # a small model
    args = ["train-scorer", "--positive", str(positive), "--negative", str(negative), "--workers", "1"]
    args += ["--config", str(root / "c.yaml")]
    assert main([*args, "--out", str(root / "model")]) == 0
    assert main([*args, "--out", str(root / "again")]) == 0
    return root


def test_train_scorer_is_reproducible_and_leaves_only_the_model(scorer):
    model = (scorer / "model" / "scorer.bin").read_bytes()
    assert model == (scorer / "again" / "scorer.bin").read_bytes()  # seed + one thread: the same bytes
    report = json.loads((scorer / "model" / "report.json").read_text())
    assert report["positive"]["docs"] == report["negative"]["docs"] == 80
    assert sorted(p.name for p in (scorer / "model").iterdir()) == ["report.json", "scorer.bin"]


def test_trained_scorer_drops_held_out_spam(scorer, tmp_path):
    held_out = good_and_spam(random.Random(99), 20, "h")
    path = write_jsonl(tmp_path / "in.jsonl", held_out)
    settings = {"label.scorer": {"kind": "fasttext", "path": str(scorer / "model" / "scorer.bin")}}
    report = run_label(
        config_for(tmp_path, **settings, **{"quality.min_score": 0.5}), [path], tmp_path / "out"
    )
    assert kept_ids(tmp_path / "out") == [r["id"] for r in held_out if "good" in r["id"]]
    drops = rejected(tmp_path / "out")
    assert [d["id"] for d in drops] == [r["id"] for r in held_out if "spam" in r["id"]]
    assert all(d["rule"] == "quality" and d["value"] < 0.5 for d in drops)
    assert report["rejected"]["quality"] == 20 and report["channel"]["en_web"]["rejected"]["quality"] == 20


PYTHON_SCORER = {"kind": "python", "path": "tests.data.preprocess.scorer_plugin:score"}  # len(text) / 1000


def channel_corpus(root: Path) -> tuple[list[Path], list[dict]]:
    """en documents of many lengths (the plug-in's score); zh: three long ones and four of one length."""
    rng = random.Random(5)
    records = [{"id": f"en{i}", "text": synth.en_doc(rng, 2 + i % 9)} for i in range(16)]
    records += [{"id": f"zh{i}", "text": synth.zh_doc(rng, 30)} for i in range(3)]
    records += [{"id": f"tie-{word}", "text": word * 100} for word in ("城市", "农村", "学校", "医院")]
    rng.shuffle(records)
    return [
        write_jsonl(root / "a.jsonl", records[::2]),
        write_jsonl(root / "b.jsonl", records[1::2]),
    ], records


def test_per_channel_threshold_and_top_fraction(tmp_path):
    """en_web drops below its threshold; zh_web keeps its best 4 of 7: the three long documents and,
    of the four that tie, the first in input order. Files are read as several ranges."""
    inputs, records = channel_corpus(tmp_path)
    rules = {"en_web": {"min_score": 0.4}, "zh_web": {"keep_fraction": 0.5}}
    settings = {"label.scorer": PYTHON_SCORER, "quality.channels": rules}
    report = run_label(config_for(tmp_path, range_mb=0.001, **settings), inputs, tmp_path / "out")
    kept = set(kept_ids(tmp_path / "out"))
    en = {r["id"] for r in records if r["id"].startswith("en")}
    assert en & kept == {r["id"] for r in records if r["id"] in en and len(r["text"]) >= 400}
    first_tie = next(r["id"] for p in inputs for r in map(json.loads, p.open()) if r["id"].startswith("tie"))
    assert kept - en == {"zh0", "zh1", "zh2", first_tie}
    assert report["channel"]["zh_web"]["docs_out"] == 4 and report["rejected"]["quality"] == len(
        records
    ) - len(kept)
    assert {d["id"] for d in rejected(tmp_path / "out")} == {r["id"] for r in records} - kept


def test_dedup_keeps_the_highest_scored_copy(scorer, tmp_path):
    """A spam-padded copy is longer and comes first: without scores dedup keeps it, with the trained
    scorer's scores it keeps the clean copy."""
    rng = random.Random(12)
    records = []
    for i in range(6):
        clean = synth.en_doc(rng, 12)
        records.append({"id": f"padded{i}", "text": clean + "\n" + "click here buy now casino bonus " * 3})
        records.append({"id": f"clean{i}", "text": clean})
    path = write_jsonl(tmp_path / "in.jsonl", records)
    loose = {"dedup.threshold": 0.5, "dedup.bands": 50, "dedup.rows": 2}
    run_dedup(config_for(tmp_path, **loose), [path], tmp_path / "unscored")
    assert kept_ids(tmp_path / "unscored") == [f"padded{i}" for i in range(6)]
    settings = {"label.scorer": {"kind": "fasttext", "path": str(scorer / "model" / "scorer.bin")}}
    run_label(config_for(tmp_path, **settings), [path], tmp_path / "label")
    labelled = sorted((tmp_path / "label").glob("part-*.jsonl"))
    run_dedup(config_for(tmp_path, **loose), labelled, tmp_path / "dedup")
    assert kept_ids(tmp_path / "dedup") == [f"clean{i}" for i in range(6)]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"quality.min_score": 0.5}, "set label.scorer"),
        ({"quality.channels": {"en_web": {"min_score": 0.5, "keep_fraction": 0.5}}}, "not both"),
        ({"quality.keep_fraction": 0.0}, r"keep_fraction must be in \(0, 1\]"),
        ({"quality.channels": {"en_web": {"min_scor": 0.5}}}, "did you mean 'min_score'"),
    ],
)
def test_bad_quality_settings_are_refused_at_load(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"label.scorer": PYTHON_SCORER, **values} if "scorer" not in message else values)
