"""transformers 4.57 beside the project's transformers 5, for checking that exports load the same in both.

vLLM, SGLang and lm-eval often run on transformers 4.x stacks. ``site_dir`` installs transformers 4.57
and the ``tokenizers``/``huggingface_hub`` releases it requires into a cache directory once per machine
(under a lock, renamed into place only when complete); ``run`` executes a script with them first on
``sys.path``. Only an unreachable package index skips; any other install failure fails the test.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

VERSION = "4.57.6"
# --no-deps: everything else transformers 4.57 needs is already installed alongside transformers 5.
REQUIREMENTS = (f"transformers=={VERSION}", "tokenizers>=0.22,<0.23", "huggingface-hub>=0.34,<1.0")
_OFFLINE = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeout",
    "Read timed out",
    "ProxyError",
)


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "megatron-pipeline" / "transformers4"


def site_dir() -> Path:
    """The directory holding transformers 4.57, installed on first use."""
    root = cache_root()
    target = root / f"{VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test runs install once
        if not target.is_dir():
            _install(root, target)
    return target


def _install(root: Path, target: Path) -> None:
    for stale in root.glob(".partial-*"):  # left by a killed install: the lock says none is running
        shutil.rmtree(stale, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--retries", "1", "--timeout", "30"]
    done = subprocess.run(
        [*command, "--target", str(partial), *REQUIREMENTS], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        if any(marker in done.stderr for marker in _OFFLINE):
            pytest.skip(f"the package index is unreachable, so transformers {VERSION} cannot be installed")
        pytest.fail(f"pip could not install {REQUIREMENTS}: {done.stderr.strip()[-2000:]}")
    partial.rename(target)


def run(script: str, *args: str, transformers4: bool = True) -> dict:
    """Run ``script`` (which prints one JSON object) with transformers 4.57, or with the project's own."""
    env = dict(os.environ)
    if transformers4:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site_dir()), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
