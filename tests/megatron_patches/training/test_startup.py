"""The start-up log line: every phase from process start to the first loss, in one line."""

from __future__ import annotations

import re

from megatron_patches.training.run import main
from tests.dist import run_on_ranks
from tests.megatron_patches.training.test_train import tiny_args


def _train_one_rank(run_dir: str) -> int:
    return main(
        tiny_args(run_dir, [], "data.mock=true", "train.train_iters=3", "optimizer.lr_warmup_iters=1")
    )


def test_the_first_loss_is_preceded_by_one_line_timing_each_start_up_phase(tmp_path, capfd):
    assert run_on_ranks(_train_one_rank, 1, str(tmp_path / "run")) == [0]
    lines = [line for line in capfd.readouterr().out.splitlines() if "start-up:" in line]
    assert len(lines) == 1, lines
    phases = dict(re.findall(r"([a-z ]+) ([\d.]+) s", lines[0].split("start-up: ")[1].split(";")[0]))
    names = [
        "imports",
        "process groups",
        "model build",
        "checkpoint load",
        "dataset indices",
        "first iteration",
    ]
    assert [name.strip() for name in phases] == names
    total = float(re.search(r"first loss ([\d.]+) s after the process started", lines[0]).group(1))
    assert float(phases["imports"]) > 0 and total >= sum(map(float, phases.values())) - 0.2
