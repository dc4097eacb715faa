"""The GPU-cluster launch path: GPUs per node, one launcher per Slurm node, no silent mock data."""

import os
import subprocess
from pathlib import Path

import pytest

from megatron_patches.training import run
from tests.megatron_patches.training.test_train import tiny_args, two_channels

REPO = Path(__file__).resolve().parents[2]
SCRUBBED = ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NUM_NODES")


@pytest.fixture
def shell_env(tmp_path) -> dict:
    """No Slurm or CUDA variables; an 8-GPU ``nvidia-smi``; a ``python`` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gpus = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(8))
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{gpus}")
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "calls"}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith("DATA_BLEND")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "PYTHON": str(bin_dir / "python")}


def _bash(script: str, env: dict, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source launch/_launch.sh; {script}"],
        cwd=REPO,
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _calls(tmp_path) -> list[str]:
    calls = tmp_path / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_gpus_per_node_come_from_cuda_visible_devices_then_slurm_then_nvidia_smi(shell_env):
    def count(**extra: str) -> str:
        done = _bash("launch_gpu_count", shell_env, **extra)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert count(CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_GPUS_ON_NODE="8") == "4"  # Slurm bound 4 of 8
    assert count(SLURM_GPUS_ON_NODE="2") == "2"
    assert count() == "8"  # every GPU of the machine
    assert count(CUDA_VISIBLE_DEVICES="") == "0"
    assert count(CUDA_VISIBLE_DEVICES="NoDevFiles") == "0"


def test_torchrun_starts_one_process_per_visible_gpu(shell_env, tmp_path):
    done = _bash("launch_training cfg.yaml a=1", shell_env, CUDA_VISIBLE_DEVICES="2,3")
    assert done.returncode == 0, done.stderr
    assert "nodes 1 x 2 processes = world 2" in done.stdout
    dry_run, torchrun = _calls(tmp_path)
    assert dry_run == "-m megatron_patches.training --config cfg.yaml a=1 --dry-run"
    assert torchrun.startswith("-m torch.distributed.run --nproc_per_node 2 --nnodes 1 --node_rank 0")


def test_sigusr1_for_the_ranks_does_not_kill_the_launcher_or_torchrun(shell_env, tmp_path):
    # `sbatch --signal=USR1@120` signals every process of the step: the shell and torchrun must
    # outlive it (the ranks checkpoint and exit 0 on it; torchrun then exits 0 too).
    torchrun = tmp_path / "bin" / "python"
    torchrun.write_text(
        '#!/bin/sh\ncase "$*" in *torch.distributed.run*) kill -USR1 "$PPID" "$$"; echo survived'
        ' "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" ;; esac\n'
    )
    done = _bash("launch_training cfg.yaml", shell_env)
    # On SIGTERM instead, torchrun gives the ranks 600 s (not 30) to checkpoint before its SIGKILL.
    assert (done.returncode, done.stdout.splitlines()[-1]) == (0, "survived 600")


def test_more_than_one_slurm_task_per_node_is_refused_before_anything_starts(shell_env, tmp_path):
    done = _bash("launch_training cfg.yaml", shell_env, SLURM_STEP_NUM_TASKS="16", SLURM_STEP_NUM_NODES="2")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "launch: error: srun started 16 tasks on 2 node(s); start one per node (srun --ntasks-per-node=1): "
        "torchrun starts each node's GPU processes"
    ]
    assert _calls(tmp_path) == []
    one_each = _bash("launch_training c.yaml", shell_env, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2")
    assert one_each.returncode == 0, one_each.stderr


def test_pretrain_7b_refuses_to_train_on_mock_data_unless_asked(shell_env, tmp_path):
    def launch(*args: str, **extra: str) -> subprocess.CompletedProcess:
        command = ["bash", "launch/pretrain_7b.sh", *args]
        env = {**shell_env, **extra}
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    refused = launch()
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "pretrain_7b.sh: error: DATA_BLEND is not set; point it at the blend.yaml of "
        "`python -m data.preprocess tokenize`, or set MOCK=1 to train on mock data on purpose"
    ]
    assert _calls(tmp_path) == []
    assert launch(MOCK="1").returncode == 0
    assert "data.mock=true" in _calls(tmp_path)[0]
    assert launch(DATA_BLEND="/data/blend.yaml").returncode == 0
    assert "data.blend=/data/blend.yaml" in _calls(tmp_path)[-1]
    assert launch("data.blend=/data/b.yaml").returncode == 0  # the blend given as an override


def test_pretrain_moe_drives_the_named_moe_config_like_pretrain_7b(shell_env, tmp_path):
    def launch(*args: str, **extra: str) -> subprocess.CompletedProcess:
        command = ["bash", "launch/pretrain_moe.sh", *args]
        env = {**shell_env, **extra}
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    unnamed = launch(MOCK="1")
    assert unnamed.returncode == 2 and len(unnamed.stderr.splitlines()) == 1
    assert "pretrain_moe.sh: error: CONFIG is not set" in unnamed.stderr
    assert launch("CONFIG=mixtral_8x7x", MOCK="1").stderr.startswith("pretrain_moe.sh: error: no config ")
    no_data = launch("CONFIG=mixtral_8x7b")
    assert no_data.returncode == 2
    assert no_data.stderr.startswith("pretrain_moe.sh: error: DATA_BLEND is not set")
    assert _calls(tmp_path) == []
    assert launch("CONFIG=mixtral_8x7b", "train.train_iters=10", MOCK="1", EP="4").returncode == 0
    dry_run, torchrun = _calls(tmp_path)
    assert "--config" in dry_run and "launch/configs/mixtral_8x7b.yaml" in dry_run and "--dry-run" in dry_run
    for arg in ("run_dir=runs/mixtral_8x7b", "parallel.expert_model_parallel_size=4", "data.mock=true"):
        assert arg in dry_run and arg in torchrun
    assert torchrun.endswith("train.train_iters=10")
    assert launch(CONFIG="launch/configs/qwen3_30b_a3b.yaml", DATA_BLEND="/data/b.yaml").returncode == 0
    assert "qwen3_30b_a3b.yaml" in _calls(tmp_path)[-1] and "data.blend=/data/b.yaml" in _calls(tmp_path)[-1]


def test_the_plan_prints_each_channel_of_the_blend_with_its_tokens(tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = two_channels(tmp_path)
    assert run.main(tiny_args(tmp_path / "run", data, "--dry-run")) == 0
    printed = capsys.readouterr().out.splitlines()
    datasets = {p: IndexedDataset(p) for p in data[1::2]}  # kept alive: their arrays are memory maps
    tokens = {p: int(d.sequence_lengths.sum()) for p, d in datasets.items()}
    zh, en = data[1], data[3]
    assert f"data zh: weight 1, {tokens[zh]:,} tokens, {zh}" in printed
    assert f"data en: weight 1, {tokens[en]:,} tokens, {en}" in printed
    assert run.main(tiny_args(tmp_path / "run", [], "data.mock=true", "--dry-run")) == 0
    assert "data: mock (random tokens, data.mock=true): nothing is learned from it" in capsys.readouterr().out
