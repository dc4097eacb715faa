"""A rank dies: `MAX_RESTARTS` (torchrun `--max-restarts`) brings the job back from its newest checkpoint.

Without ``parallel._restart_round_store`` the restarted ranks read the dead round's gloo addresses from
torchrun's store and fail: "Gloo connectFullMesh failed ... Connection refused".
"""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.dist import run_on_ranks
from tests.megatron_patches.training.test_train import _train, losses, tiny_args, two_channels

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The rank processes torchrun started for this launcher (not their checkpoint writers)."""
    children = psutil.Process(launcher.pid).children(recursive=True)
    torchrun = [p for p in children if "torch.distributed.run" in " ".join(p.cmdline())]
    return [rank for p in torchrun for rank in p.children()]


def _kill_a_rank_after(launcher: subprocess.Popen, checkpoint: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not checkpoint.is_dir():
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before the checkpoint"
        time.sleep(0.05)
    os.kill(_ranks(launcher)[-1].pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_rank_restarts_the_job_which_resumes_and_repeats_the_uninterrupted_losses(tmp_path):
    data = two_channels(tmp_path)
    common = ["train.train_iters=20", "checkpoint.save_interval=4", "logging.log_interval=1"]
    config = tmp_path / "config.yaml"
    config.write_text("seed: 1234\n")
    run_dir = tmp_path / "restarted"
    args = " ".join(f"'{a}'" for a in tiny_args(run_dir, data, *common))
    env = {**os.environ, "NPROC": "2", "MAX_RESTARTS": "1", "MASTER_PORT": str(_free_port())}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    launcher = subprocess.Popen(
        ["bash", "-c", f"source launch/_launch.sh; launch_training {config} {args}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _kill_a_rank_after(launcher, run_dir / "checkpoints" / "iter_0000004")
        output, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            for process in _ranks(launcher):
                process.kill()
            launcher.kill()
    (tmp_path / "launcher.log").write_text(output)
    assert launcher.returncode == 0, output[-3000:]
    resumed = [line for line in output.splitlines() if "resume from: " in line and "iter_" in line]
    assert resumed, output[-3000:]  # the restarted ranks resumed from a checkpoint, not from scratch

    reference = tmp_path / "uninterrupted"
    assert run_on_ranks(_train, 2, tiny_args(reference, data, *common), timeout=600) == [0, 0]
    assert losses(run_dir) == losses(reference)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 21))  # each iteration logged once
