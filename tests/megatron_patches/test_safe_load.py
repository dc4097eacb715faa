"""A checkpoint from elsewhere cannot run code when it is read, and a damaged one fails in one line.

Each planted pickle reduces to ``os.system("touch MARKER")``: the marker must never appear.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_patches import safe_load
from megatron_patches.errors import ConfigError
from tests.tools.convert import tiny
from tools.convert import commands, mcore_io

REPO = Path(__file__).resolve().parents[3]


class Planted:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return tiny.save_hf("llama_gqa", tmp_path_factory.mktemp("src") / "hf")


@pytest.fixture(scope="module")
def release(hf, tmp_path_factory) -> Path:
    """A torch_dist checkpoint root (``hf2mcore --format torch_dist``), never modified."""
    root = tmp_path_factory.mktemp("dist") / "mcore"
    commands.hf2mcore(hf, root, fmt="torch_dist", quiet=True)
    return root


@pytest.fixture
def ckpt(release, tmp_path) -> Path:
    """A private copy of ``release`` for a test to tamper with."""
    return Path(shutil.copytree(release, tmp_path / "mcore"))


def plant_in_metadata(iter_dir: Path, marker: Path) -> None:
    """Keep the real metadata, so that a load that ran the payload would otherwise succeed."""
    metadata = pickle.loads((iter_dir / ".metadata").read_bytes())
    metadata.planner_data = Planted(marker)
    (iter_dir / ".metadata").write_bytes(pickle.dumps(metadata))


def _refused(message: str, marker: Path, call, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        call(*args, quiet=True, **kwargs)
    text = str(err.value)
    assert message in text and "\n" not in text, text
    assert not marker.exists(), "the planted code ran"
    return text


@pytest.mark.parametrize(
    "command", [commands.mcore2hf, commands.mcore2mcore], ids=["mcore2hf", "mcore2mcore"]
)
def test_planted_metadata_runs_nothing(ckpt, tmp_path, command):
    marker = tmp_path / "ran"
    plant_in_metadata(ckpt / "release", marker)
    text = _refused(
        "pickles posix.system, which no checkpoint holds", marker, command, ckpt, tmp_path / "out"
    )
    assert str(ckpt / "release" / ".metadata") in text
    assert not (tmp_path / "out").exists()


def _torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("pack", "message"),
    [
        (pickle.dumps, "is not a torch.save archive; refusing to unpickle it"),
        (_torch_save_bytes, "pickles posix.system, which no checkpoint holds"),
    ],
    ids=["pickle", "torch.save"],
)
def test_planted_pickle_in_a_shard_runs_nothing(ckpt, tmp_path, pack, message):
    """PyTorch loads a shard's pickled entries (RNG state, ``_extra_state``) with ``weights_only=False``."""
    marker, iter_dir = tmp_path / "ran", ckpt / "release"
    metadata = pickle.loads((iter_dir / ".metadata").read_bytes())
    index, info = next(
        (i, s) for i, s in metadata.storage_data.items() if i.fqn.endswith("_extra_state/shard_0_4")
    )
    payload = pack(Planted(marker))
    shard = iter_dir / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(payload)
    with open(shard, "ab") as file:
        file.write(payload)
    (iter_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    text = _refused(message, marker, commands.mcore2hf, ckpt, tmp_path / "out")
    assert f"{shard} (entry {index.fqn})" in text


def test_planted_common_state_runs_nothing(ckpt, tmp_path):
    marker, common = tmp_path / "ran", ckpt / "release" / "common.pt"
    torch.save({**safe_load.safe_torch_load(common, common), "extra": Planted(marker)}, common)
    _refused(
        f"cannot read {common}: it pickles posix.system", marker, commands.mcore2hf, ckpt, tmp_path / "o"
    )


def test_truncated_missing_and_escaping_shards_are_named_in_one_line(ckpt, tmp_path):
    iter_dir = ckpt / "release"
    shard = max(iter_dir.glob("*.distcp"), key=lambda path: path.stat().st_size)  # one with tensors
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000])
    needed = len(data)
    message = f"{shard} is truncated: {needed - 1000} bytes, but .metadata needs {needed}"
    _refused(message, tmp_path / "ran", commands.mcore2hf, ckpt, tmp_path / "out")
    shard.unlink()
    _refused(f"missing shard {shard}", tmp_path / "ran", commands.mcore2mcore, ckpt, tmp_path / "out")

    metadata = pickle.loads((iter_dir / ".metadata").read_bytes())
    next(iter(metadata.storage_data.values())).relative_path = "../../elsewhere.distcp"
    (iter_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    _refused(
        "names a shard outside its directory", tmp_path / "ran", commands.mcore2hf, ckpt, tmp_path / "out"
    )
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_rewritten_after_vetting_is_vetted_again(ckpt, tmp_path):
    """The trainer vets when it plans and again when it loads: a swap in between must not pass."""
    iter_dir = ckpt / "release"
    assert safe_load.verify_torch_dist(iter_dir).common["model_config"]["num_layers"] == 4
    plant_in_metadata(iter_dir, tmp_path / "ran")
    with pytest.raises(ConfigError, match="pickles posix.system"):
        safe_load.verify_torch_dist(iter_dir)
    assert not (tmp_path / "ran").exists()


def test_cli_prints_one_line_and_runs_nothing(ckpt, tmp_path):
    marker = tmp_path / "ran"
    plant_in_metadata(ckpt / "release", marker)
    command = ["mcore2hf", "--mcore", str(ckpt), "--out", str(tmp_path / "o")]
    done = subprocess.run(
        [sys.executable, "-m", "tools.convert", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("python -m tools.convert: error: ") and "pickles posix.system" in line
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_legacy_rank_file_and_pytorch_bin_name_the_planted_class(hf, tmp_path):
    """These are read with ``weights_only``; the error says what was refused, not how to load it unsafely."""
    marker = tmp_path / "ran"
    rank_file = mcore_io.rank_file(tmp_path / "legacy" / "release", 0, 0, 1)
    rank_file.parent.mkdir(parents=True)
    torch.save({"model": {}, "payload": Planted(marker)}, rank_file)
    mcore_io.write_tracker(tmp_path / "legacy", "release")
    message = f"cannot read {rank_file}: it pickles posix.system, which no checkpoint holds"
    _refused(message, marker, commands.mcore2hf, tmp_path / "legacy", tmp_path / "out")

    bin_dir = Path(shutil.copytree(hf, tmp_path / "bin"))
    (bin_dir / "model.safetensors").unlink()
    torch.save({"payload": Planted(marker)}, bin_dir / "pytorch_model.bin")
    message = f"cannot read {bin_dir / 'pytorch_model.bin'}: it pickles posix.system"
    _refused(message, marker, commands.hf2mcore, bin_dir, tmp_path / "out")


# A torch_dist read that skips safe_load's vetting; safe_load itself is the one place allowed.
_DIRECT_READ = re.compile(
    r"dist_checkpointing\.load\b|load_common_state_dict|load_tensors_metadata|load_sharded_metadata"
    r"|FileSystemReader|pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)"
)


def test_every_checkpoint_read_goes_through_the_vetting():
    sources = [
        p for d in ("megatron_patches", "tools", "data", "launch", "bench") for p in (REPO / d).rglob("*.py")
    ]
    direct = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sources
        if path.name != "safe_load.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _DIRECT_READ.search(line) and not line.lstrip().startswith(("#", '"', "``"))
    ]
    assert direct == []
