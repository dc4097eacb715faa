"""The overlap rule, stale-temp-dir detection and atomic writes shared by every writer in the project."""

from __future__ import annotations

import json
import os
import stat

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


def test_a_failed_atomic_dir_leaves_nothing_that_looks_complete(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), paths.atomic_dir(target) as temp:
        (temp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed halfway")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "old.bin").write_text("previous output")
    with pytest.raises(RuntimeError), paths.atomic_dir(target, replace=True):
        raise RuntimeError("killed halfway")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "old.bin").read_text() == "previous output"


def test_an_existing_output_is_replaced_only_when_asked(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.bin").write_text("previous output")
    hint = "pass --overwrite to replace it"
    refused = pytest.raises(ConfigError, match=rf"^output .*out already exists; {hint}$")
    with refused, paths.atomic_dir(target, exists_hint=hint):
        pytest.fail("nothing may be written")
    with paths.atomic_dir(target, replace=True) as temp:
        (temp / "new.bin").write_text("new output")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["new.bin"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)], ids=["022", "027"])
def test_an_atomic_dir_honours_the_umask(tmp_path, umask, mode):
    # A shared cluster's other users must be able to read a finished checkpoint.
    before = os.umask(umask)
    try:
        with paths.atomic_dir(tmp_path / "ckpt") as temp:
            (temp / "release").mkdir()
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == mode


def test_an_atomic_dir_removes_a_dead_writers_leftover_and_reports_a_live_ones(tmp_path, capsys):
    target = tmp_path / "out"
    dead = tmp_path / f".out.partial-{paths.owner_tag(2**40)}-0123abcd"  # no such pid can exist
    live = tmp_path / f".out.partial-{paths.owner_tag()}-0123abcd"  # this process: still writing
    for leftover in (dead, live):
        leftover.mkdir()
        (leftover / "shard").write_bytes(b"x" * 3000)
    with paths.atomic_dir(target, writers="stage runs") as temp:
        assert paths.temp_dir_target(temp) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out"])
    err = capsys.readouterr().err
    assert f"removed 1 partial output(s) of killed stage runs ({dead.name}) in {tmp_path}" in err
    assert "freed 2.93 KiB" in err
    assert f"left partial output {live} (its writer, pid {os.getpid()}, is still running)" in err


def test_a_failed_atomic_file_keeps_the_old_content_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.jsonl"
    paths.write_json_atomic(path, {"loss": "2.5 → 2.4"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"loss": "2.5 → 2.4"}
    with pytest.raises(RuntimeError), paths.atomic_file(path) as temp:
        temp.write_text("half a reco")
        raise RuntimeError("killed halfway")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert json.loads(path.read_text(encoding="utf-8")) == {"loss": "2.5 → 2.4"}
