"""Run ``python -m tools.eval`` as a user would, from the repository root."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def run_eval(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tools.eval", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
