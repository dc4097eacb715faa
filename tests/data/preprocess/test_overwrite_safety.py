"""`--overwrite` replaces an output directory, never an input: overlapping paths are refused up front."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data.preprocess.cli import main
from megatron_patches.errors import ConfigError
from tests.data.preprocess.conftest import mixed_docs, write_jsonl

ROOT = Path(__file__).resolve().parents[3]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_of_a_directory_holding_the_input_is_refused_and_the_input_survives(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    raw = write_jsonl(work / "raw.jsonl", mixed_docs(1, 10))
    before = _snapshot(work)
    done = subprocess.run(
        [sys.executable, "-m", "data.preprocess", "clean", "--input", str(raw), "--out", str(work)]
        + ["--overwrite", "--workers", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"python -m data.preprocess: error: --out {work} contains the input --input {raw}, "
        "which writing there could replace or delete: write the output elsewhere"
    ]
    assert _snapshot(work) == before


def test_a_tokenizer_or_config_inside_the_output_is_refused(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", mixed_docs(2, 5))
    out = tmp_path / "tokenized"
    (out / "tok").mkdir(parents=True)
    (out / "tok" / "tokenizer.json").write_text("{}")
    (out / "c.yaml").write_text("workers: 1\n")
    tokenize = ["tokenize", "--input", str(raw), "--tokenizer", str(out / "tok")]
    with pytest.raises(ConfigError, match=r"--out .*tokenized contains the input --tokenizer .*tok,"):
        main([*tokenize, "--out", str(out), "--overwrite"])
    clean = ["clean", "--config", str(out / "c.yaml"), "--input", str(raw)]
    with pytest.raises(ConfigError, match=r"--out .*tokenized contains the input --config .*c.yaml,"):
        main([*clean, "--out", str(out), "--overwrite"])
    assert (out / "tok" / "tokenizer.json").read_text() == "{}" and (out / "c.yaml").is_file()


def test_run_refuses_a_stage_directory_that_holds_an_input(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "clean").mkdir(parents=True)
    raw = write_jsonl(run_dir / "clean" / "raw.jsonl", mixed_docs(3, 5))
    config = tmp_path / "c.yaml"
    config.write_text(f"input: [{raw}]\nworkers: 1\nstages: [clean]\n")
    with pytest.raises(
        ConfigError, match=r"the clean stage's output .*run/clean contains the input listed in"
    ):
        main(["run", "--config", str(config), "--out", str(run_dir), "--overwrite"])
    assert raw.is_file()
