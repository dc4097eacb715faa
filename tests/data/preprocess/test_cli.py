"""The CLI: one `error:` line for bad input; `run` takes the demo corpus to a blend and resumes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data.preprocess.cli import _overrides, build_parser, main
from megatron_patches.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "data" / "demo" / "config.yaml"


@pytest.mark.parametrize(
    "config_text,message",
    [
        (
            "input: [x.jsonl]\ndedup: {bands: 4, rowz: 2}\n",
            "unknown config key 'dedup.rowz'; did you mean 'rows'?",
        ),
        ("input: [x.jsonl]\ndedup: {engine: hadoop}\n", "dedup.engine must be one of"),
        (
            "input: [x.jsonl]\ntokenizer: {vocab_size: many}\n",
            "config key 'tokenizer.vocab_size' expects int, got 'many'",
        ),
        ("input: [x.jsonl\n", "is not valid YAML"),
        ("input: [x.jsonl]\nrange_mb: -1\n", "range_mb must be >= 0"),
        ("input: [nothing-here-*.jsonl]\n", "matches no file"),
    ],
)
def test_bad_config_is_one_error_line(tmp_path, config_text, message):
    (tmp_path / "bad.yaml").write_text(config_text)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.preprocess",
            "run",
            "--config",
            str(tmp_path / "bad.yaml"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("python -m data.preprocess: error:") and message in lines[0]
    )
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_demo_run_end_to_end_and_resume(tmp_path, capsys):
    demo = tmp_path / "demo_config"
    shutil.copytree(DEMO.parent, demo, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    out = tmp_path / "demo"
    args = ["run", "--config", str(demo / "config.yaml"), "--out", str(out), "--workers", "1"]
    assert main(args) == 0
    blend = yaml.safe_load((out / "tokenized" / "blend.yaml").read_text())
    assert set(blend["channels"]) == {"zh_web", "en_web", "code", "markdown", "math"}
    assert blend["data_path"][::2] == pytest.approx([2 / 11, 4 / 11, 0.5 / 11, 0.5 / 11, 4 / 11])
    assert (out / "tokenized" / blend["tokenizer"]).resolve() == (out / "tokenizer").resolve()
    reports = {name: json.loads((out / name / "report.json").read_text()) for name in ("clean", "dedup")}
    assert reports["clean"]["malformed_lines"] == 5 and reports["clean"]["pii"]["id_number"] == 40
    assert reports["dedup"]["rejected"]["dedup_exact"] > 0 and reports["dedup"]["rejected"]["dedup_near"] > 0
    capsys.readouterr()

    assert main(args) == 0
    assert capsys.readouterr().err.count("skipped") == 5

    settings = yaml.safe_load((demo / "config.yaml").read_text())
    settings["blend"]["ratios"] = {"zh_web": 1, "en_web": 1, "code": 1, "markdown": 1, "math": 1}
    (demo / "config.yaml").write_text(yaml.safe_dump(settings))
    assert main(args) == 0
    assert capsys.readouterr().err.count("skipped") == 4  # only tokenize reran
    assert yaml.safe_load((out / "tokenized" / "blend.yaml").read_text())["data_path"][0] == 0.2


def test_range_mb_flag_sets_the_config():
    args = build_parser().parse_args(["clean", "--input", "x.jsonl", "--out", "o", "--range-mb", "0.5"])
    assert _overrides(args) == {"range_mb": 0.5}


@pytest.mark.parametrize(
    ("args", "url"),
    [
        (["clean", "--input", "x.jsonl", "--out", "hdfs://namenode/work/clean"], "hdfs:/namenode/work/clean"),
        (["label", "--input", "s3://bucket/raw/*.jsonl", "--out", "o"], "s3://bucket/raw/*.jsonl"),
    ],
)
def test_a_url_is_refused_not_written_as_a_local_folder(tmp_path, monkeypatch, args, url):
    """Stages use local file calls: `--out hdfs://nn/x` used to create ./hdfs:/nn/x on the driver."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="is a URL.*mount the store") as error:
        main(args)
    assert url in str(error.value) and not list(tmp_path.iterdir())


def test_engine_flags_set_every_stage():
    args = build_parser().parse_args(["run", "--out", "o", "--engine", "spark", "--spark-master", "local[4]"])
    settings = {"engine": "spark", "dedup.engine": "spark"}
    assert _overrides(args) == {**settings, "spark_master": "local[4]", "dedup.spark_master": "local[4]"}
