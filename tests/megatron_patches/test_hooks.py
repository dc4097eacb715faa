"""The patch registry and option helpers; the shipped example config plans what it says."""

from pathlib import Path

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.hooks import build_hooks, number_option, patch_options, run_dir_file
from megatron_patches.training import run
from megatron_patches.training.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_option_helpers_accept_yaml_numbers_and_name_what_is_wrong():
    assert patch_options("p", {"a": 2}, {"a": 1, "b": 3}) == {"a": 2, "b": 3}
    assert number_option("x", "1e6") == 1e6  # YAML 1.1 reads 1e6 as a string
    assert number_option("x", 3, integer=True) == 3
    with pytest.raises(ConfigError, match=r"x must be an integer above 0, got '3'"):
        number_option("x", "3", integer=True)
    with pytest.raises(ConfigError, match=r"x must be a number above 1, got True"):
        number_option("x", True, minimum=1)
    assert run_dir_file("p", "f", "a.jsonl", "/runs/r") == Path("/runs/r/a.jsonl")


def test_patches_switch_off_by_config():
    cfg = load_config(None, [])
    patches = {"channel_loss": False, "save_trigger": {"enabled": False}, "loss_spike": None}
    assert build_hooks(patches, cfg) == []
    [hook] = build_hooks({"channel_loss": True, "save_trigger": False}, cfg)
    assert hook.name == "channel_loss"


def test_example_config_plans_two_stages_and_prints_the_trigger_files(tmp_path, capsys):
    config = REPO / "launch" / "configs" / "tiny_patches.yaml"
    assert run.main(["--config", str(config), f"run_dir={tmp_path}", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "phase main/stage0: iterations 0..39, seq 64, global batch 8" in printed
    assert "phase main/stage1: iterations 40..49, seq 128, global batch 4" in printed
    assert f"checkpoint and stop: touch {tmp_path.resolve()}/stop" in printed
    names = [hook.name for hook in build_hooks(load_config(config).patches, load_config(config))]
    assert names == ["channel_loss", "save_trigger", "rope_schedule", "loss_spike"]
