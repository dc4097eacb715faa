"""`run` killed with SIGKILL leaves no pool worker and no resource tracker behind."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .conftest import mixed_docs, write_jsonl

ROOT = Path(__file__).resolve().parents[3]


def _busy_corpus(root: Path) -> Path:
    """Enough text that the clean stage is still running when it is killed a few seconds in."""
    docs = mixed_docs(3, 400) * 20
    for k in range(4):
        write_jsonl(root / f"part{k}.jsonl", docs)
    config = root / "config.yaml"
    config.write_text(f"input: [{root}/*.jsonl]\nworkers: 2\n", encoding="utf-8")
    return config


def _pool_workers(parent: psutil.Process) -> list[psutil.Process]:
    try:
        return [p for p in parent.children() if "--multiprocessing-fork" in p.cmdline()]
    except psutil.NoSuchProcess:
        return []


def _descendants_once_pool_runs(parent: psutil.Process, timeout_s: float = 120) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while len(_pool_workers(parent)) < 2:
        if time.monotonic() > deadline:
            pytest.fail("the pool never started two workers")
        time.sleep(0.1)
    return parent.children(recursive=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_sigkill_of_run_leaves_no_child(tmp_path):
    config = _busy_corpus(tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data.preprocess", "run", "--config", str(config), "--out", str(out)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    try:
        children = _descendants_once_pool_runs(psutil.Process(proc.pid))
        commands = [" ".join(child.cmdline()) for child in children]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # The stage was unfinished, so its pool (workers and resource tracker) was alive at the kill.
        assert not (out / "clean" / "report.json").exists()
        assert any("resource_tracker" in command for command in commands)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not [p.pid for p in alive], "children outlived a SIGKILLed parent"
    finally:
        proc.kill()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
