"""`run` resumes complete stages, and redoes a stage whose input data or referenced files changed."""

from __future__ import annotations

import os

import pytest
import yaml

from data.preprocess import pipeline
from data.preprocess.cli import main

from .conftest import mixed_docs, write_jsonl


@pytest.fixture
def project(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", mixed_docs(11, 40))
    (tmp_path / "block.txt").write_text("免费彩票\n", encoding="utf-8")
    config = {
        "input": ["in.jsonl"],
        "stages": ["clean", "label"],
        "clean": {"blocklists": ["block.txt"]},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return tmp_path


def _run(project, capsys) -> str:
    args = ["run", "--config", str(project / "config.yaml"), "--out", str(project / "out")]
    assert main([*args, "--workers", "1"]) == 0
    return capsys.readouterr().err


def test_unchanged_inputs_are_skipped(project, capsys):
    _run(project, capsys)
    assert _run(project, capsys).count("skipped") == 2


def test_an_edited_blocklist_redoes_clean_and_every_later_stage(project, capsys):
    _run(project, capsys)
    (project / "block.txt").write_text("免费彩票\nthe\n", encoding="utf-8")
    err = _run(project, capsys)
    assert "skipped" not in err
    report = yaml.safe_load((project / "out" / "clean" / "report.json").read_text())
    assert report["rejected"]["blocklist"] > 0  # the new keyword took effect


def test_changed_input_data_redoes_the_stages(project, capsys):
    _run(project, capsys)
    write_jsonl(project / "in.jsonl", mixed_docs(12, 40))
    assert "skipped" not in _run(project, capsys)


def test_large_files_are_compared_by_size_and_mtime(project, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "HASHED_BYTES", 0)
    _run(project, capsys)
    assert _run(project, capsys).count("skipped") == 2
    stat = os.stat(project / "block.txt")
    os.utime(project / "block.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert "skipped" not in _run(project, capsys)
