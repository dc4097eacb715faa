"""An installed (non-editable) copy of the project works next to another repository's ``tools`` package.

The project is built and installed with ``pip install --target`` from a copy of this checkout; the
commands run with ``python -S`` and an explicit PYTHONPATH (the paths under test, then this
interpreter's path for the dependencies), so the checkout's editable install, which ``site`` would
activate through its ``.pth`` file, cannot stand in for the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {
    "mcore-convert": "python -m tools.convert",
    "mcore-preprocess": "python -m data.preprocess",
    "mcore-train": "python -m megatron_patches.training",
    "mcore-eval": "python -m tools.eval",
    "mcore-infer": "python -m tools.infer",
}
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "runs", "__pycache__", "*.egg-info", ".*cache", ".whl"
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packaging")
    source, target = root / "source", root / "target"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)  # a build writes build/ and *.egg-info beside it
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(source)], check=True, cwd=root)
    return target


@pytest.fixture(scope="module")
def conflicting(tmp_path_factory) -> Path:
    """A directory holding another project's top-level ``tools`` package, as Megatron-LM's checkout."""
    root = tmp_path_factory.mktemp("megatron_lm")
    (root / "tools").mkdir()
    (root / "tools" / "__init__.py").write_text('ORIGIN = "another project"\n')
    return root


def _dependency_path() -> list[str]:
    """This interpreter's import path (torch, Megatron-Core, ...; a system site too) minus the checkout."""
    return [p for p in sys.path if p and not (Path(p) / "megatron_patches").is_dir()]


def _python(*args: str, path: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, path), *_dependency_path()])}
    return subprocess.run([sys.executable, "-S", *args], env=env, cwd=cwd, capture_output=True, text=True)


def test_wheel_installs_no_generic_top_level_names(installed):
    top_level = {p.name for p in installed.iterdir()} - {"bin", "__pycache__"}
    assert not top_level & {"tools", "data", "megatron_patches"}
    assert {"megatron_pipeline_cli.py", "megatron-pipeline-packages"} <= top_level


@pytest.mark.slow  # five fresh interpreters importing torch and Megatron-Core
@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_entry_point_help_with_a_conflicting_tools_first_on_the_path(installed, conflicting, script):
    proc = _python(str(installed / "bin" / script), "--help", path=[conflicting, installed], cwd=conflicting)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {ENTRY_POINTS[script]}")


def test_installing_does_not_shadow_another_projects_tools(installed, conflicting, tmp_path):
    # The install target first, as site-packages usually is: it must hold no `tools` to shadow with.
    proc = _python("-c", "import tools; print(tools.ORIGIN)", path=[installed, conflicting], cwd=tmp_path)
    assert proc.stdout.strip() == "another project", proc.stderr


def test_subprocesses_of_an_entry_point_run_the_installed_code(installed, conflicting, tmp_path):
    # tools.eval's trends run `python -m tools.convert` in a subprocess; it must find the same code.
    child = "subprocess.run([sys.executable, '-S', '-m', 'tools.convert', '--help'], check=True)"
    script = f"import subprocess, sys, megatron_pipeline_cli as cli; cli.put_code_root_first(); {child}"
    proc = _python("-c", script, path=[conflicting, installed], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m tools.convert")


def test_python_m_from_the_repository_root_wins_over_a_conflicting_tools(conflicting):
    proc = _python("-m", "tools.convert", "--help", path=[conflicting], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m tools.convert")
