"""A conversion's start-up imports only what it uses: Megatron-Core and torch._dynamo cost seconds each.

Importing ``megatron.core`` (2+ s on 2 cores) was paid by every ``mcore2hf`` for the enum classes a
Megatron-LM ``args`` may pickle, and ``torch._dynamo`` (1.5 s) by ``torch.cat`` of ``meta`` tensors
while planning shapes; on the 7B benchmark that was a fifth of the conversion's time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.tools.convert import tiny
from tools.convert import commands

REPO = Path(__file__).resolve().parents[3]
_CONVERT_AND_LIST_IMPORTS = """
import sys
from tools.convert import commands
work = sys.argv[1]
commands.hf2mcore(work + "/hf", work + "/out_legacy", tp=2, pp=2, quiet=True)
commands.mcore2hf(work + "/legacy", work + "/back_legacy", quiet=True)
commands.mcore2hf(work + "/dist", work + "/back_dist", quiet=True)
print(sorted(m for m in ("megatron.core", "torch._dynamo") if m in sys.modules))
"""


def test_hf2mcore_and_mcore2hf_of_either_format_import_neither_megatron_core_nor_dynamo(tmp_path):
    tiny.save_hf("llama_gqa", tmp_path / "hf", seed=1)
    commands.hf2mcore(tmp_path / "hf", tmp_path / "legacy", tp=2, pp=2, quiet=True)
    commands.hf2mcore(tmp_path / "hf", tmp_path / "dist", fmt="torch_dist", quiet=True)
    done = subprocess.run(
        [sys.executable, "-c", _CONVERT_AND_LIST_IMPORTS, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "[]"
    for name in ("back_legacy", "back_dist"):
        tiny.assert_same_tensors(tiny.hf_tensors(tmp_path / "hf"), tiny.hf_tensors(tmp_path / name))
