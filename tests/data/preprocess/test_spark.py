"""The Spark engine (local[2], Java 17) keeps exactly the documents the local engine keeps."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data.demo import synth
from data.preprocess.dedup import run_dedup

from .conftest import config_for, write_jsonl
from .test_dedup import LINES, PER_CHANNEL, boilerplate_corpus, channel_corpus, near_duplicate

pytest.importorskip("pyspark")
if shutil.which("java") is None:
    pytest.skip("the Spark engine needs Java (17+)", allow_module_level=True)


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    from data.preprocess.dedup.spark import spark_session

    no_ui = {"spark.ui.enabled": "false"}  # starts faster; a user's run prints the UI's address
    session = spark_session(config_for(None, **{"dedup.spark_master": "local[2]", "dedup.spark_conf": no_ui}))
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    assert SparkSession.getActiveSession() is None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("spark_corpus")
    rng = random.Random(21)
    texts = [synth.zh_doc(rng, 12) if i % 2 else synth.en_doc(rng, 12) for i in range(120)]
    records = [{"id": f"o{i}", "text": t, "quality": round(rng.random(), 3)} for i, t in enumerate(texts)]
    records += [{"id": f"n{i}", "text": near_duplicate(rng, texts[i])} for i in range(30)]
    records += [{"id": f"x{i}", "text": texts[40 + i]} for i in range(10)]
    records.append({"id": "broken"})  # no text: malformed, counted by both engines
    rng.shuffle(records)
    for k in range(3):
        write_jsonl(root / f"part{k}.jsonl", records[k::3])
    return sorted(root.glob("*.jsonl"))


def outcome(out):
    kept = sorted(json.loads(line)["id"] for p in out.glob("part-*.jsonl") for line in p.open())
    rejected = sorted(
        (r["id"], r["rule"], r["duplicate_of"])
        for p in (out / "rejected").glob("dedup_*.jsonl")
        for r in map(json.loads, p.open())
    )
    return kept, rejected


@pytest.mark.parametrize(("verify", "range_mb"), [("exact", 0.01), ("signature", 0)])
def test_spark_and_local_keep_the_same_documents(spark, corpus, tmp_path, verify, range_mb):
    """With range_mb 0.01 Spark reads each file as several ranges (partitions), local reads it whole."""
    local = run_dedup(config_for(tmp_path, **{"dedup.verify": verify}), corpus, tmp_path / "local")
    settings = {"dedup.verify": verify, "dedup.engine": "spark", "dedup.spark_master": "local[2]"}
    remote = run_dedup(config_for(tmp_path, range_mb=range_mb, **settings), corpus, tmp_path / "spark")
    assert outcome(tmp_path / "spark") == outcome(tmp_path / "local")
    assert sorted(p.name for p in (tmp_path / "spark").glob("part-*")) == sorted(
        p.name for p in (tmp_path / "local").glob("part-*")
    )
    kept, rejected = outcome(tmp_path / "local")
    assert len(kept) + len(rejected) == 160 and len(rejected) >= 38
    for key in ("docs_in", "docs_out", "rejected", "malformed", "clusters"):
        assert remote[key] == local[key], key


def test_spark_submit_entry_point(spark, corpus, tmp_path):
    """What a cluster user runs: spark-submit on data/spark_submit.py, here with master local[2]."""
    submit = Path(sys.executable).with_name("spark-submit")
    if not submit.exists():
        pytest.skip("pyspark's spark-submit is not next to this interpreter")
    root = Path(__file__).resolve().parents[3]
    run_dedup(config_for(tmp_path), corpus, tmp_path / "local")
    args = [str(submit), "--master", "local[2]", "--conf", "spark.ui.enabled=false"]
    args += [str(root / "data" / "spark_submit.py"), "dedup"]
    args += [
        "--engine",
        "spark",
        "--input",
        *map(str, corpus),
        "--out",
        str(tmp_path / "submitted"),
        "--workers",
        "1",
    ]
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert outcome(tmp_path / "submitted") == outcome(tmp_path / "local")


@pytest.mark.parametrize("verify", ["exact", "signature"])
def test_spark_applies_per_channel_thresholds_as_local_does(spark, tmp_path, verify):
    (tmp_path / "in").mkdir()
    inputs = channel_corpus(tmp_path / "in")
    settings = {**PER_CHANNEL, "dedup.verify": verify}
    local = run_dedup(config_for(tmp_path, **settings), inputs, tmp_path / "local")
    spark_settings = {**settings, "dedup.engine": "spark", "dedup.spark_master": "local[2]"}
    remote = run_dedup(config_for(tmp_path, **spark_settings), inputs, tmp_path / "spark")
    assert outcome(tmp_path / "spark") == outcome(tmp_path / "local")
    assert remote["channel"] == local["channel"]
    assert local["channel"]["news"]["docs_out"] < local["channel"]["wiki"]["docs_out"]


def test_spark_cuts_the_same_boilerplate_lines_as_local(spark, tmp_path):
    (tmp_path / "in").mkdir()
    inputs, _ = boilerplate_corpus(tmp_path / "in")
    local = run_dedup(config_for(tmp_path, **LINES), inputs, tmp_path / "local")
    settings = {**LINES, "dedup.engine": "spark", "dedup.spark_master": "local[2]"}
    remote = run_dedup(config_for(tmp_path, **settings), inputs, tmp_path / "spark")
    for name in ("part-00000-00000.jsonl", "part-00001-00000.jsonl", "rejected/dedup_lines.jsonl"):
        assert (tmp_path / "spark" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    for key in ("lines_cut", "boilerplate_lines", "rejected", "channel"):
        assert remote[key] == local[key], key


def compared_tree(root: Path) -> dict[str, object]:
    """Every output file of a `run`: bytes, or for report.json the report less timings and engine
    settings; the run directory's path is cut out (reports and data_path.txt name it)."""
    tree: dict[str, object] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "fingerprint.json"):
        data = path.read_bytes().replace(str(root).encode(), b"<run>")
        if path.name == "report.json":
            report = json.loads(data)
            for key in ("seconds", "docs_per_s", "mb_per_s"):
                report.pop(key)
            for key in ("engine", "spark_master", "spark_conf"):
                report.get("params", {}).pop(key, None)
            data = report
        tree[str(path.relative_to(root))] = data
    return tree


def test_whole_run_on_spark_writes_what_the_local_engine_writes(spark, tmp_path):
    """clean, label, dedup, train-tokenizer and tokenize on local[2] and on the local engine: the same
    files (parts, rejects, tokenizer, .bin/.idx, blend), byte for byte, and the same report counts."""
    from data.preprocess.pipeline import run_pipeline

    from .conftest import mixed_docs

    docs = mixed_docs(5, 60)
    docs += [dict(d, id=f"copy-{d['id']}") for d in docs[:10]] + [{"id": "short", "text": "tiny"}]
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl.gz", docs[0::2])
    with open(write_jsonl(tmp_path / "in" / "b.jsonl", docs[1::2]), "a") as handle:
        handle.write('{"id": "broken"\n')
    settings = {
        "input": [str(tmp_path / "in" / "*")],
        "tokenizer.vocab_size": 1024,
        "dedup.verify": "signature",
    }
    settings |= {"tokenizer.reserved_tokens": 8, "tokenizer.holdout_docs": 5}
    run_pipeline(config_for(tmp_path, **settings), tmp_path / "local")
    spark.sparkContext.setJobGroup("whole-run", "the whole run on Spark")
    spark_settings = {**settings, "engine": "spark", "workers": 2}
    reports = run_pipeline(config_for(tmp_path, **spark_settings), tmp_path / "spark")
    jobs = spark.sparkContext.statusTracker().getJobIdsForGroup("whole-run")
    assert len(jobs) >= 5  # every stage ran on Spark, not on the local engine
    local, remote = compared_tree(tmp_path / "local"), compared_tree(tmp_path / "spark")
    assert remote.keys() == local.keys() and "tokenized/zh_web_text_document.bin" in local
    for name in local:
        assert remote[name] == local[name], name
    assert reports["dedup"]["docs_in"] > reports["dedup"]["docs_out"] and reports["clean"]["malformed_lines"]


def test_quality_scorer_on_spark_writes_what_the_local_engine_writes(spark, tmp_path):
    """train-scorer, then label dropping by its score (zh_web: threshold, en_web: top fraction, a score
    pass and a cut) on local[2], files read as ranges: the same model bytes, parts, rejects and counts."""
    from data.preprocess.label_stage import run_label
    from data.preprocess.train_scorer import run_train_scorer

    from .test_quality import good_and_spam

    rng = random.Random(4)
    (tmp_path / "in").mkdir()
    train = good_and_spam(rng, 30, "t")
    positive = write_jsonl(tmp_path / "in" / "good.jsonl", [r for r in train if "good" in r["id"]])
    negative = write_jsonl(tmp_path / "in" / "bad.jsonl", [r for r in train if "spam" in r["id"]])
    docs = good_and_spam(rng, 15, "d") + [{"id": f"zh{i}", "text": synth.zh_doc(rng, 4)} for i in range(10)]
    inputs = [write_jsonl(tmp_path / "in" / f"docs{k}.jsonl", docs[k::2]) for k in range(2)]
    rules = {"zh_web": {"min_score": 0.2}, "en_web": {"keep_fraction": 0.6}}
    spark.sparkContext.setJobGroup("quality", "train-scorer and label on Spark")
    for engine, extra in (("local", {}), ("spark", {"engine": "spark", "range_mb": 0.002})):
        small = config_for(tmp_path, **{"train_scorer.dim": 8, "train_scorer.bucket": 1000}, **extra)
        run_train_scorer(small, [positive], [negative], tmp_path / engine / "scorer")
        scorer = {"kind": "fasttext", "path": str(tmp_path / engine / "scorer" / "scorer.bin")}
        settings = {"label.scorer": scorer, "quality.channels": rules, **extra}
        run_label(config_for(tmp_path, **settings), inputs, tmp_path / engine / "label")
    local, remote = compared_tree(tmp_path / "local"), compared_tree(tmp_path / "spark")
    assert remote == local and "scorer/scorer.bin" in local and "label/rejected/quality.jsonl" in local
    channels = local["label/report.json"]["channel"]
    assert channels["en_web"]["docs_out"] == 18 and channels["zh_web"]["rejected"]["quality"] > 0
    jobs = spark.sparkContext.statusTracker().getJobIdsForGroup("quality")
    assert len(jobs) == 3  # on Spark: train-scorer's examples, label's score pass, label's labelling pass
