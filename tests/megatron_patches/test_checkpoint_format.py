"""The checkpoint format's one owner: names, tracker, common state, listing, pruning, stale saves."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_patches import paths
from megatron_patches.errors import ConfigError
from megatron_patches.formats import checkpoint as ckpt_format
from megatron_patches.formats.model_config import ModelConfig


def _iteration(root, iteration: int):
    path = root / ckpt_format.iteration_dir_name(iteration)
    path.mkdir(parents=True)
    (path / ckpt_format.DIST_MARKER).write_text("{}")
    return path


def test_iteration_names_round_trip_and_bad_names_fail_in_one_line(tmp_path):
    assert ckpt_format.iteration_of(tmp_path / ckpt_format.iteration_dir_name(1200)) == 1200
    assert ckpt_format.iteration_of(tmp_path / "release") == "release"
    with pytest.raises(ConfigError, match=r"iter_0000100\.tmp is named neither iter_XXXXXXX nor release$"):
        ckpt_format.iteration_of(tmp_path / "iter_0000100.tmp")


def test_latest_follows_the_tracker_and_none_without_one(tmp_path):
    assert ckpt_format.latest(tmp_path) is None and ckpt_format.latest(None) is None
    _iteration(tmp_path, 10)
    ckpt_format.write_tracker(tmp_path, 10)
    assert ckpt_format.latest(tmp_path) == tmp_path / "iter_0000010"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # tracker written atomically


def test_pruning_spares_the_checkpoint_a_roll_back_look_back_needs_and_newer_ones(tmp_path):
    for iteration in (4, 8, 12, 16, 20):
        _iteration(tmp_path, iteration)
    ckpt_format.write_tracker(tmp_path, 20)
    # keep_last=1, but a roll-back after iteration 21 reaching 4 back needs iter_16 (newest at or before 17)
    removed = ckpt_format.prune(tmp_path, keep_last=1, keep_from=17)
    assert [p.name for p in removed] == ["iter_0000004", "iter_0000008", "iter_0000012"]
    assert [it for it, _ in ckpt_format.complete_iterations(tmp_path)] == [16, 20]
    assert ckpt_format.prune(tmp_path, keep_last=1, keep_from=3) == []  # none that old: keep them all
    assert [p.name for p in ckpt_format.prune(tmp_path, keep_last=1)] == ["iter_0000016"]


def test_a_save_in_progress_is_neither_listed_nor_pruned_and_the_tracked_one_survives(tmp_path):
    for iteration in (10, 20, 30, 40):
        _iteration(tmp_path, iteration)
    in_progress = paths.owned_temp_dir(tmp_path / "iter_0000050")
    in_progress.mkdir()
    (tmp_path / "iter_notes").mkdir()
    ckpt_format.write_tracker(tmp_path, 10)  # a resume from an older checkpoint still points there
    assert [it for it, _ in ckpt_format.complete_iterations(tmp_path)] == [10, 20, 30, 40]
    removed = ckpt_format.prune(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["iter_0000020"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(
        [
            in_progress.name,
            "iter_0000010",
            "iter_0000030",
            "iter_0000040",
            "iter_notes",
            ckpt_format.TRACKER_FILE,
        ]
    )


def test_stale_saves_of_any_iteration_are_removed_only_when_their_writer_is_gone(tmp_path):
    dead = tmp_path / f".iter_0000100.partial-{paths.owner_tag(2**40)}-0123abcd"  # no such pid can exist
    also_dead = tmp_path / f".iter_0000200.partial-{paths.owner_tag(2**40)}-89abcdef"
    live = tmp_path / f".iter_0000300.partial-{paths.owner_tag()}-0123abcd"
    for path in (dead, also_dead, live):
        path.mkdir()
        (path / "shard.distcp").write_bytes(b"x" * 10)
    cleanup = ckpt_format.clean_stale_saves(tmp_path)
    assert cleanup.removed == [dead, also_dead] and cleanup.freed_bytes == 20
    assert cleanup.kept == [(live, f"its writer, pid {os.getpid()}, is still running")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_leftovers_of_earlier_saves_superseded_copies_go_the_last_copy_and_unowned_ones_stay(tmp_path):
    dead, live = paths.owner_tag(2**40), paths.owner_tag()  # no pid 2**40 can exist
    _iteration(tmp_path, 100)
    superseded = tmp_path / f".iter_0000100.old-{dead}-0123abcd"  # iter_0000100 was written again
    last_copy = tmp_path / f".iter_0000200.old-{dead}-0123abcd"  # killed between the two renames
    writing = tmp_path / f".iter_0000100.old-{live}-89abcdef"  # its writer still runs
    pre_atomic = tmp_path / "iter_0000050.tmp"  # a save interrupted before saves were atomic
    for path in (superseded, last_copy, writing, pre_atomic):
        path.mkdir()
        (path / "shard.distcp").write_bytes(b"x" * 10)
    cleanup = ckpt_format.clean_leftovers(tmp_path)
    assert cleanup.removed == [superseded] and cleanup.freed_bytes == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["iter_0000100", last_copy.name, writing.name, pre_atomic.name]
    )
    line = ckpt_format.describe_leftovers(tmp_path, cleanup)
    assert line == (
        f"checkpoint leftovers in {tmp_path}: removed {superseded.name} (a superseded copy; 10 B freed); "
        f"kept {pre_atomic.name} (a save interrupted before saves were atomic: nothing reads it, "
        "delete it); "
        f"kept {writing.name} (its writer, pid {os.getpid()}, is still running); "
        f"kept {last_copy.name} (iter_0000200 is missing and this is its last complete copy: "
        "rename it iter_0000200)"
    )
    assert ckpt_format.describe_leftovers(tmp_path, ckpt_format.clean_leftovers(tmp_path / "none")) is None


def test_common_state_carries_the_version_and_refuses_a_foreign_checkpoint(tmp_path):
    common = ckpt_format.CommonState(
        {"num_layers": 2}, iteration=7, consumed_samples=56, parallel_layout=[2, 1]
    )
    saved = common.to_dict()
    assert saved[ckpt_format.VERSION] == ckpt_format.CHECKPOINT_VERSION
    assert ckpt_format.RUN_SETTINGS not in saved  # not recorded: not written
    assert ckpt_format.CommonState.from_dict({**saved, "optimizer": {}}, "ckpt") == common
    with pytest.raises(
        ConfigError,
        match="^ckpt records neither model_config nor Megatron-LM args; give the architecture with",
    ):
        ckpt_format.CommonState.from_dict({"iteration": 7}, "ckpt")


def test_a_legacy_release_is_read_through_its_rank_files(tmp_path):
    cfg = ModelConfig()
    release = tmp_path / ckpt_format.RELEASE
    common = ckpt_format.CommonState(cfg.to_dict(), ckpt_format.RELEASE, pipeline_layers=[1, 1])
    for pp_rank in range(2):
        path = ckpt_format.rank_file(release, 0, pp_rank, 2)
        path.parent.mkdir(parents=True)
        torch.save({"model": {}, **common.to_dict()}, path)
    ckpt_format.write_tracker(tmp_path, ckpt_format.RELEASE)
    assert ckpt_format.checkpoint_format(release) == "torch" and ckpt_format.is_iteration_dir(release)
    assert ckpt_format.legacy_layout(release) == (1, 2)
    assert ckpt_format.pipeline_layers(release, 2) == [1, 1]
    assert ckpt_format.read_model_config(tmp_path) == cfg
    ckpt_format.rank_file(release, 0, 1, 2).unlink()
    with pytest.raises(
        ConfigError, match=r"incomplete checkpoint: .*mp_rank_00_001/model_optim_rng\.pt is missing"
    ):
        ckpt_format.legacy_layout(release)


def test_the_format_module_loads_neither_megatron_nor_the_rooms_above_it():
    code = (
        "import sys, megatron_patches.formats.checkpoint\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'tools', 'data')"
        " or m.startswith('megatron_patches.training')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
