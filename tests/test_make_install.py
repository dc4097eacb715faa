"""`make install` keeps a CUDA machine's torch and pins the CPU wheel only on CPU machines.

Each case fakes the machine: an ``nvidia-smi`` first on PATH that lists a GPU or none, and a ``torch``
first on PYTHONPATH whose ``version.cuda`` says which build the active python has. ``make -n`` prints
the commands ``make install`` would run without running them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="needs GNU make")

NVIDIA_SMI_GPU = "#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000)'\n"
NVIDIA_SMI_NONE = "#!/bin/sh\necho 'No devices were found'\nexit 6\n"


def _machine(tmp_path: Path, gpu_listed: bool, torch_cuda: str | None) -> dict[str, str]:
    """A clean environment (no inherited PYTHON/EXTRAS/MAKEFLAGS) for a faked machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(NVIDIA_SMI_GPU if gpu_listed else NVIDIA_SMI_NONE)
    smi.chmod(0o755)
    (bin_dir / "python3").symlink_to(sys.executable)
    fake_torch = tmp_path / "fake_site" / "torch"
    fake_torch.mkdir(parents=True)
    (fake_torch / "__init__.py").write_text(f"class version:\n    cuda = {torch_cuda!r}\n")
    path = f"{bin_dir}:{Path(MAKE).parent}:/usr/bin:/bin"
    return {"PATH": path, "PYTHONPATH": str(tmp_path / "fake_site"), "HOME": str(tmp_path)}


def _planned(tmp_path: Path, env: dict[str, str], *args: str, goal: str = "install") -> str:
    venv = tmp_path / "venv"
    cmd = [MAKE, "-n", "-C", str(REPO), goal, f"VENV={venv}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout


def _pip_extras(plan: str) -> set[str]:
    spec = re.search(r'pip install -q -e "([^"]*)"', plan).group(1)
    extras = re.fullmatch(r"\.(?:\[(.*)\])?", spec).group(1)
    return set(extras.split(",")) if extras else set()


def _venv_command(plan: str) -> str:
    return next(line for line in plan.splitlines() if " -m venv " in line)


@pytest.mark.parametrize(
    ("gpu_listed", "torch_cuda"), [(True, None), (False, "12.8")], ids=["nvidia-smi", "cuda-torch"]
)
def test_cuda_machine_keeps_the_environment_torch(tmp_path, gpu_listed, torch_cuda):
    plan = _planned(tmp_path, _machine(tmp_path, gpu_listed, torch_cuda))
    assert "cpu" not in _pip_extras(plan)  # no torch==<cpu wheel> pin
    assert _pip_extras(plan) == set()  # only what training needs: no Spark, fastText, pytest
    assert "python3 -m venv --system-site-packages" in _venv_command(plan)


def test_cuda_machine_tests_get_the_dev_extras_without_the_cpu_pin(tmp_path):
    plan = _planned(tmp_path, _machine(tmp_path, True, None), goal="test")
    assert _pip_extras(plan) == {"dev"}


def test_cpu_machine_pins_the_cpu_wheel_as_before(tmp_path):
    plan = _planned(tmp_path, _machine(tmp_path, False, None))
    assert _pip_extras(plan) == {"cpu", "dev"}
    assert "--system-site-packages" not in _venv_command(plan)
    assert "python3.11 -m venv" in _venv_command(plan)


def test_cuda_machine_override_to_cpu(tmp_path):
    plan = _planned(tmp_path, _machine(tmp_path, True, "12.8"), "CUDA_MACHINE=0")
    assert _pip_extras(plan) == {"cpu", "dev"}


def test_cuda_machine_refuses_a_venv_holding_cpu_torch(tmp_path):
    env = _machine(tmp_path, True, None)  # the venv's python sees the fake CPU torch too
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    # The venv's python runs `-c` checks; it must never get as far as pip.
    (venv_bin / "python").write_text(
        f'#!/bin/sh\n[ "$1" = -m ] && {{ echo "pip ran" >&2; exit 3; }}\nexec {sys.executable} "$@"\n'
    )
    (venv_bin / "python").chmod(0o755)
    cmd = [MAKE, "-s", "-C", str(REPO), "install", f"VENV={tmp_path / 'venv'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("make")]
    assert len(ours) == 1 and "CPU build of torch on a CUDA machine" in ours[0], proc.stderr
    assert "make clean install" in ours[0]
    assert not list((tmp_path / "venv").glob(".installed*"))
