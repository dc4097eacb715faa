"""The overlap rule and stale-temp-dir detection shared by the converter, preprocessing and the trainer."""

from __future__ import annotations

import os

import pytest

from megatron_patches import paths
from megatron_patches.errors import ConfigError


def test_paths_that_only_share_a_name_prefix_do_not_overlap(tmp_path):
    paths.refuse_overlap({"--out": tmp_path / "model-out"}, {"--hf": [tmp_path / "model", None], "--x": None})
    with pytest.raises(ConfigError, match="--out .*model/../model is the input --hf"):
        paths.refuse_overlap({"--out": f"{tmp_path}/model/../model"}, {"--hf": [tmp_path / "model"]})


def test_only_a_dead_local_owners_directory_is_stale(tmp_path):
    target = tmp_path / "ckpt"
    mine = paths.owned_temp_dir(target)
    unowned = tmp_path / ".ckpt.partial-0123456789ab"  # named before owners were recorded
    other_target = tmp_path / f".ckpt2.partial-{paths.owner_tag(2**40)}-0123abcd"
    dead = tmp_path / f".ckpt.partial-{paths.owner_tag(2**40)}-0123abcd"  # no such pid can exist
    for path in (mine, unowned, other_target, dead):
        path.mkdir()
    (dead / "shard").write_bytes(b"x" * 100)
    cleanup = paths.clean_stale_temp_dirs(target)
    assert cleanup.removed == [dead] and cleanup.freed_bytes == 100
    assert dict(cleanup.kept) == {
        mine: f"its writer, pid {os.getpid()}, is still running",
        unowned: "its owner is not recorded in its name",
    }
    assert mine.is_dir() and unowned.is_dir() and other_target.is_dir()
