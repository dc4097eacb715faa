"""The benchmark scripts still run end to end (tiny sizes): they are not timed tests, but a figure
in the README is only as good as the script that can reproduce it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_bench(*args: str, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_patches_overhead_prints_the_ratios_and_each_patch():
    out = _run_bench("bench/patches_overhead.py", "--iters", "30", "--reps", "1", "--probes", "10")
    assert "expected iteration" in out and "median: off" in out and "neighbouring iterations" in out
    assert "  plain iterations: median off" in out and "  log iterations: median off" in out
    for name in ("channel_loss", "save_trigger", "rope_schedule", "loss_spike"):
        assert f"  {name}: mean" in out


@pytest.mark.slow
def test_train_throughput_compares_backends_on_the_tiny_preset():
    out = _run_bench(
        "bench/train_throughput.py",
        *("--preset", "tiny", "--iters", "8", "--warmup", "2", "--backends", "unfused,sdpa"),
    )
    assert "unfused" in out and "sdpa" in out


@pytest.mark.slow
def test_preprocess_bench_measures_clean_and_both_tokenize_ratios(tmp_path):
    out = _run_bench(
        "bench/preprocess.py",
        *("--mb", "1", "--baseline-mb", "0.5", "--vocab", "2048", "--workdir", str(tmp_path)),
        *("--only", "clean", "--only", "tokenize"),
    )
    assert "clean" in out and "tokenize, same bytes" in out and "tokenize, full corpus" in out
