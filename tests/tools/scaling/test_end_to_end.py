"""The real trainer under ``tools.scaling run``: 2 sizes x 2 token budgets of tiny models on mock data."""

import json
import math
from pathlib import Path

import pytest

from tools.scaling import runner
from tools.scaling.cli import main

TINY = Path(__file__).resolve().parents[3] / "launch/configs/tiny.yaml"


@pytest.mark.slow
def test_a_tiny_grid_trains_through_the_trainer_cli_and_a_second_run_skips_it(tmp_path, capsys):
    out = tmp_path / "sweep"
    main(
        ["plan", "--config", str(TINY), "--out", str(out), "--widths", "32,64"]
        + ["--tokens", f"{10 * 8 * 64},{20 * 8 * 64}", "--set", "checkpoint.save_interval=5"]
    )
    main(["run", "--out", str(out), "--nproc", "1"])
    results = {(r["shape"]["hidden_size"], r["train_iters"]): r for r in runner.finished_results(out)}
    assert sorted(results) == [(32, 10), (32, 20), (64, 10), (64, 20)]
    for (_, iters), result in results.items():
        assert math.isfinite(result["val_loss"]) and math.isfinite(result["train_loss"])
        checkpoints = out / "runs" / result["name"] / "checkpoints"
        assert (checkpoints / f"iter_{iters:07d}").is_dir()  # the trainer ran the point's own schedule
    for width in (32, 64):  # more tokens, lower loss
        assert results[width, 20]["val_loss"] < results[width, 10]["val_loss"]
    capsys.readouterr()
    main(["run", "--out", str(out), "--nproc", "1"])
    assert capsys.readouterr().out.count("finished before, skipped") == 4
    assert json.loads((out / "plan.json").read_text())["sets"] == ["checkpoint.save_interval=5"]
