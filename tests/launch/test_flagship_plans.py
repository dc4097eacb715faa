"""The shipped GPU configs validate at their intended world size, and their memory plan fits 80 GB."""

from __future__ import annotations

import re

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.training.run import main

FLAGSHIPS = [  # config, the world size its layout comment names (the configs hold TP/PP)
    ("launch/configs/llama2_7b.yaml", 8),
    ("launch/configs/llama2_7b_long_context.yaml", 8),
    ("launch/configs/llama2_70b.yaml", 64),
    ("launch/configs/deepseek_moe_2b.yaml", 8),
    ("launch/configs/mixtral_8x7b.yaml", 64),
    ("launch/configs/qwen3_30b_a3b.yaml", 32),
]


@pytest.mark.parametrize("config, world", FLAGSHIPS)
def test_flagship_config_plans_fit_80_gb_per_gpu(config, world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = [
        "--config",
        config,
        "--dry-run",
        "data.mock=true",
        f"run_dir={tmp_path}",
        "train.gpu_memory_gb=80",
    ]
    assert main(args) == 0
    totals = [float(gib) for gib in re.findall(r"memory per GPU: ([\d.]+) GiB", capsys.readouterr().out)]
    assert totals and max(totals) <= 80


def test_the_70b_config_runs_the_interleaved_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "64")
    args = ["--config", FLAGSHIPS[2][0], "--dry-run", "data.mock=true", f"run_dir={tmp_path}"]
    assert main([*args, "train.gpu_memory_gb=80"]) == 0
    out = capsys.readouterr().out
    assert "TP 8 x PP 4 x DP 2, 5 virtual stages per PP rank (interleaved 1F1B)" in out
    assert "1 x 5 in flight" in out  # first stage: PP x (1 + (PP - 1) / (PP x VPP)) = 4.6 micro-batches


@pytest.mark.parametrize(
    "config, world, layout",
    [
        (FLAGSHIPS[4][0], 64, "TP 2 x PP 4 x DP 8; experts: EP 8 x ETP 1 x expert-DP 2"),
        (FLAGSHIPS[5][0], 32, "TP 1 x PP 2 x DP 16; experts: EP 8 x ETP 1 x expert-DP 2"),
    ],
)
def test_the_moe_configs_plan_their_expert_parallel_layout(
    config, world, layout, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert main(["--config", config, "--dry-run", "data.mock=true", f"run_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert f"world {world} = {layout}" in out
    assert "moe_load: tokens per expert of the" in out  # load balance logged from the first iteration


def test_a_plan_above_gpu_memory_gb_is_refused_with_the_breakdown_and_the_micro_batch_that_fits(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "8")
    config, _ = FLAGSHIPS[0]
    args = ["--config", config, "--dry-run", "data.mock=true", f"run_dir={tmp_path}"]
    with pytest.raises(ConfigError) as refused:
        main([*args, "train.micro_batch_size=8", "train.gpu_memory_gb=80"])
    message = str(refused.value)
    assert "\n" not in message
    assert "train.gpu_memory_gb=80" in message and "activations" in message and "optimizer" in message
    advised = int(re.search(r"micro_batch_size=(\d+) fits", message).group(1))
    assert 1 < advised < 8
    assert main([*args, f"train.micro_batch_size={advised}", "train.gpu_memory_gb=80"]) == 0
    with pytest.raises(ConfigError):  # and it is the largest that fits
        main([*args, f"train.micro_batch_size={advised * 2}", "train.gpu_memory_gb=80"])
