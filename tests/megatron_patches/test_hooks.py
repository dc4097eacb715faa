"""The patch registry and option helpers; the shipped example config plans what it says."""

from pathlib import Path

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.hooks import PATCHES, build_hooks, number_option, run_dir_file
from megatron_patches.training import run
from megatron_patches.training.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_option_helpers_accept_yaml_numbers_and_name_what_is_wrong():
    assert number_option("x", "1e6") == 1e6  # YAML 1.1 reads 1e6 as a string
    assert number_option("x", 3, integer=True) == 3
    with pytest.raises(ConfigError, match=r"x must be an integer above 0, got '3'"):
        number_option("x", "3", integer=True)
    with pytest.raises(ConfigError, match=r"x must be a number above 1, got True"):
        number_option("x", True, minimum=1)
    assert run_dir_file("p", "f", "a.jsonl", "/runs/r") == Path("/runs/r/a.jsonl")


@pytest.mark.parametrize(
    ("patches", "message"),
    [
        (
            {"loss_spike": {"warmpu": 3}},
            "unknown config key 'patches.loss_spike.warmpu'; did you mean 'warmup'?",
        ),
        (
            {"loss_spike": {"min_ratio": "high"}},
            "config key 'patches.loss_spike.min_ratio' expects float, got 'high'",
        ),
        ({"save_trigger": {"save_file": ["a"]}}, "config key 'patches.save_trigger.save_file' expects str"),
        (
            {
                "rope_schedule": {
                    "stages": [{"seq_length": 64, "rotary_base": 1e4}],
                    "keep_tokens_per_iteration": 1,
                }
            },
            "config key 'patches.rope_schedule.keep_tokens_per_iteration' expects bool, got 1",
        ),
        ({"rope_schedule": {}}, "config section patches.rope_schedule needs stages"),
        ({"probes": {"file": "p.yaml"}}, "config section patches.probes needs tokenizer"),
    ],
)
def test_patch_options_are_typed_and_a_bad_key_is_one_line_naming_it(patches, message):
    with pytest.raises(ConfigError) as err:
        build_hooks(patches, load_config(None, ["run_dir=/tmp/r"]))
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_every_patch_reads_its_options_into_a_dataclass():
    import dataclasses
    import importlib

    for name, module_name in PATCHES.items():
        options = importlib.import_module(module_name).Options
        assert dataclasses.is_dataclass(options), name


def test_the_loops_context_provides_everything_the_hook_context_promises():
    import dataclasses

    from megatron_patches.hooks import HookContext
    from megatron_patches.training.loop import TrainContext

    promised = set(HookContext.__annotations__)
    assert promised == {"cfg", "run_dir", "objects", "writer", "state", "phase"}
    assert promised <= {f.name for f in dataclasses.fields(TrainContext)}


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
