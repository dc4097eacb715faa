"""``launch/slurm_pretrain.sbatch``: requeues itself until the trainer's ``RUN_DIR/finished.json`` exists,
with stub ``srun``/``scontrol`` on PATH (what they were called with is recorded)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm_pretrain.sbatch"

# The step: records its arguments, removes the marker as the trainer's start does, then finishes the run,
# exits with a code, or waits for SIGUSR1.
SRUN = """#!/bin/bash
echo "srun $*" >> "$CALLS"
rm -f "$RUN_DIR/finished.json"
case "$SRUN_DOES" in
    finish) echo '{"iteration": 4}' > "$RUN_DIR/finished.json" ;;
    exit-*) exit "${SRUN_DOES#exit-}" ;;
    wait-usr1)
        trap 'echo "srun got USR1" >> "$CALLS"; exit 0' USR1
        touch "$CALLS.started"
        for _ in $(seq 600); do sleep 0.1; done
        exit 9 ;;
esac
"""


@pytest.fixture
def slurm(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "scontrol $*" >> "$CALLS"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (tmp_path / "run").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {
        **env,
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "CALLS": str(tmp_path / "calls"),
        "RUN_DIR": str(tmp_path / "run"),
        "SLURM_JOB_ID": "42",
    }


def _sbatch(env: dict, *args: str, **extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    done = subprocess.run(
        ["bash", str(SBATCH), *args],
        cwd=REPO,
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = Path(env["CALLS"])
    return done, calls.read_text().splitlines() if calls.exists() else []


def test_the_job_requeues_itself_until_the_run_has_finished(slurm):
    directives = [line.split()[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--requeue" in directives and any(d.startswith("--signal=B:USR1@") for d in directives)

    done, calls = _sbatch(slurm, "launch/pretrain_moe.sh", "a=1", SRUN_DOES="finish")
    assert done.returncode == 0, done.stderr
    assert calls == ["srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash launch/pretrain_moe.sh a=1"]
    for ended in ("exit-0", "exit-1"):  # stopped after its checkpoint (time limit), or a rank failed
        Path(slurm["CALLS"]).unlink()
        done, calls = _sbatch(slurm, SRUN_DOES=ended)
        assert calls[1:] == ["scontrol requeue 42"], (ended, done.stderr)
        assert calls[0].endswith("bash launch/pretrain_7b.sh")  # the default launch script


def test_refusals_and_the_requeue_limit_end_the_job_without_requeue(slurm):
    refused, calls = _sbatch(slurm, SRUN_DOES="exit-2")  # a config error stays one on every try
    assert (refused.returncode, len(calls)) == (2, 1)
    done, calls = _sbatch(slurm, SRUN_DOES="exit-0", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    assert (done.returncode, len(calls)) == (1, 2)
    assert done.stderr.splitlines() == [
        "slurm_pretrain.sbatch: error: not finished after 3 requeues (MAX_REQUEUES=3); not requeueing"
    ]
    no_run_dir = {k: v for k, v in slurm.items() if k != "RUN_DIR"}
    done, calls = _sbatch(no_run_dir)
    assert (done.returncode, len(done.stderr.splitlines()), len(calls)) == (2, 1, 2)  # srun not called


def test_sigusr1_before_the_time_limit_reaches_the_step_and_the_job_requeues(slurm):
    job = subprocess.Popen(
        ["bash", str(SBATCH)], cwd=REPO, env={**slurm, "SRUN_DOES": "wait-usr1"}, stdout=subprocess.PIPE
    )
    started = Path(slurm["CALLS"] + ".started")
    for _ in range(600):  # srun is running (no timing is asserted: this only waits for it)
        if started.exists() or job.poll() is not None:
            break
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@600 does
    assert job.wait(timeout=60) == 0
    calls = Path(slurm["CALLS"]).read_text().splitlines()
    assert calls[1:] == ["srun got USR1", "scontrol requeue 42"]
