"""An output can never destroy an input, and a killed conversion's partial output is cleaned up next time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_patches import paths
from megatron_patches.errors import ConfigError
from tests.tools.convert import tiny
from tools.convert import commands

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny.save_hf("llama_gqa", tmp_path_factory.mktemp("src") / "llama")


@pytest.fixture(scope="module")
def mcore(llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mcore") / "ckpt"
    commands.hf2mcore(llama, out, quiet=True)
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.convert", *args, "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_force_onto_the_input_itself_is_refused_and_the_input_survives(llama, tmp_path):
    model = _copy(llama, tmp_path / "M")
    before = _snapshot(model)
    done = _convert("hf2mcore", "--hf", str(model), "--out", str(model), "--force")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"python -m tools.convert: error: --out {model} is the input --hf {model}, "
        "which writing there could replace or delete: write the output elsewhere"
    ]
    assert _snapshot(model) == before and [p.name for p in tmp_path.iterdir()] == ["M"]


def test_force_onto_a_parent_of_the_input_is_refused_and_unrelated_files_survive(llama, tmp_path):
    sandbox = tmp_path / "sb"
    _copy(llama, sandbox / "m")
    (sandbox / "notes.txt").write_text("unrelated")
    before = _snapshot(sandbox)
    done = _convert("hf2mcore", "--hf", str(sandbox / "m"), "--out", str(sandbox), "--force")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert f"--out {sandbox} contains the input --hf {sandbox / 'm'}" in done.stderr
    assert _snapshot(sandbox) == before


def test_an_output_reached_through_a_symlink_is_refused(llama, tmp_path):
    model = _copy(llama, tmp_path / "M")
    (tmp_path / "alias").symlink_to(model)
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=r"--out .*alias \(-> .*M\) is the input --hf"):
        commands.hf2mcore(model, tmp_path / "alias", force=True, quiet=True)
    with pytest.raises(ConfigError, match=r"--out .*alias/sub \(-> .*M/sub\) lies inside the input --hf"):
        commands.hf2mcore(model, tmp_path / "alias" / "sub", force=True, quiet=True)
    assert _snapshot(model) == before and not (model / "sub").exists()


@pytest.mark.parametrize(
    "case",
    ["mcore2hf into the checkpoint", "mcore2hf over its tokenizer", "mcore2mcore onto its root", "hf2hf"],
)
def test_every_direction_refuses_an_output_overlapping_an_input(case, llama, mcore, tmp_path):
    hf = _copy(llama, tmp_path / "hf")
    calls = {
        "mcore2hf into the checkpoint": (commands.mcore2hf, mcore, mcore / "export", {}),
        "mcore2hf over its tokenizer": (commands.mcore2hf, mcore, hf, {"tokenizer": str(hf)}),
        "mcore2mcore onto its root": (commands.mcore2mcore, mcore / "release", mcore, {"tp": 2}),
        "hf2hf": (commands.hf2hf, hf, hf, {"to": "llama"}),
    }
    convert, source, out, extra = calls[case]
    before = _snapshot(mcore), _snapshot(hf)
    with pytest.raises(ConfigError) as err:
        convert(source, out, force=True, quiet=True, **extra)
    assert "which writing there could replace or delete: write the output elsewhere" in str(err.value)
    assert "\n" not in str(err.value)
    assert (_snapshot(mcore), _snapshot(hf)) == before


def test_an_export_beside_the_iteration_under_the_checkpoint_root_is_allowed(mcore):
    # tools.eval --convert exports <root>/iter_N into <root>/hf/: nothing of the input is replaced there.
    commands.mcore2hf(mcore / "release", mcore / "hf" / "release", quiet=True)
    assert (mcore / "hf" / "release" / "config.json").is_file() and (mcore / "release").is_dir()


def test_a_killed_conversions_partial_output_is_removed_by_the_next_run(llama, tmp_path, capfd):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "120"])
    try:
        stale = tmp_path / f".out.partial-{paths.owner_tag(dead.pid)}-0123abcd"
        (stale / "release").mkdir(parents=True)
        (stale / "release" / "rank.pt").write_bytes(b"x" * 3000)
        running = tmp_path / f".out.partial-{paths.owner_tag(live.pid)}-0123abcd"
        elsewhere = tmp_path / ".out.partial-node-17.cluster-4242-0123abcd"
        for path in (running, elsewhere):
            path.mkdir()
        commands.hf2mcore(llama, tmp_path / "out", quiet=True)
        assert not stale.exists() and running.is_dir() and elsewhere.is_dir()
    finally:
        live.kill()
        live.wait()
    err = capfd.readouterr().err
    assert f"removed 1 partial output(s) of killed conversions ({stale.name})" in err
    assert "freed 2.93 KiB" in err
    assert f"left partial output {running} (its writer, pid {live.pid}, is still running)" in err
    assert f"left partial output {elsewhere} (written from host node-17.cluster)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, elsewhere.name, "out"])


def test_a_config_transformers_rejects_leaves_no_export_and_says_why(mcore, tmp_path, monkeypatch):
    """mcore2hf checks config.json with transformers beside the tensor export (its import takes seconds):
    a rejection still leaves no output, and no temporary directory, behind."""
    import transformers

    def reject(*args, **kwargs):
        raise ValueError("rope_theta must be positive")

    monkeypatch.setattr(transformers.AutoConfig, "for_model", reject)
    with pytest.raises(ConfigError, match="transformers rejects the exported llama config: rope_theta"):
        commands.mcore2hf(mcore, tmp_path / "hf", quiet=True)
    assert list(tmp_path.iterdir()) == []
