"""bench/gpu_check.sh keeps going after a failed step and reports every step (it runs only on a lent GPU)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_every_step_after_a_failure_and_reports_it(tmp_path):
    # A stand-in interpreter: megatron.core "imports", pytest fails, everything else succeeds.
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\ncase "$*" in "-m pytest "*) exit 3 ;; esac\nexit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "results"
    env = {**os.environ, "PYTHON": str(fake)}
    done = subprocess.run(["bash", "bench/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True)
    summary = (out / "summary.txt").read_text()
    steps = ("install", "pytest_gpu", "throughput_1b", "logits", "recompute_full", "recompute_sel")
    assert [line.split()[0] for line in summary.splitlines()[: len(steps)]] == list(steps)
    failed = [line.split()[0] for line in summary.splitlines() if "FAILED" in line]
    assert failed == ["pytest_gpu", "logits"]
    assert "failed steps: 2" in summary and done.returncode == 1
