"""``run`` (resumable, one run directory per point), ``fit`` and ``predict`` through the CLI, fake trainer."""

import json
import sys
from pathlib import Path

import pytest

from megatron_patches.errors import ConfigError, run_cli
from megatron_patches.paths import write_json_atomic
from tools.scaling import runner
from tools.scaling.benchmark import Sigmoid
from tools.scaling.cli import PROG, main
from tools.scaling.law import Law

FAKE = f"{sys.executable} {Path(__file__).with_name('fake_trainer.py')}"
TRUE = Law(E=1.8, A=30.0, B=60.0, alpha=0.3, beta=0.3)
SIGMOID = Sigmoid(floor=0.25, ceiling=0.9, slope=2.0, midpoint=8.0)  # the benchmark's accuracy vs loss
BASE = """
model: {num_layers: 2, hidden_size: 64, ffn_hidden_size: 176, num_attention_heads: 4, num_query_groups: 2}
data: {seq_length: 32}
train: {micro_batch_size: 2, global_batch_size: 4, train_iters: 20}
optimizer: {lr: 3.0e-3, min_lr: 3.0e-4, lr_warmup_iters: 2}
"""


def planned_sweep(tmp_path: Path, tokens: str = "1280,2560") -> tuple[Path, list]:
    (tmp_path / "base.yaml").write_text(BASE)
    out = tmp_path / "sweep"
    main(
        ["plan", "--config", str(tmp_path / "base.yaml"), "--out", str(out)]
        + ["--widths", "32,64,128", "--tokens", tokens]
    )
    _, points = runner.load_plan(out)
    losses = {p.name: float(TRUE.loss(p.params, p.tokens)) for p in points}
    (tmp_path / "losses.json").write_text(json.dumps(losses))
    return out, points


def calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.txt").read_text().split()


def test_a_failed_point_stops_the_sweep_and_the_next_run_resumes_it_skipping_finished_ones(
    tmp_path, monkeypatch
):
    out, points = planned_sweep(tmp_path)
    monkeypatch.setenv("FAKE_FAIL", points[2].name)
    with pytest.raises(ConfigError, match=f"point {points[2].name} failed with exit status 1"):
        main(["run", "--out", str(out), "--launcher", FAKE])
    assert calls(tmp_path) == [p.name for p in points[:3]]
    assert not (runner.run_dir(out, points[2]) / runner.RESULT_FILE).exists()  # no result for a failed run
    main(["run", "--out", str(out), "--launcher", FAKE])
    assert calls(tmp_path) == [p.name for p in points[:3]] + [p.name for p in points[2:]]
    results = runner.finished_results(out)
    assert [r["name"] for r in results] == [p.name for p in points]
    first = results[0]
    assert first["val_loss"] == pytest.approx(TRUE.loss(points[0].params, points[0].tokens))
    assert first["val_channels"] == {"en": pytest.approx(first["val_loss"] - 0.05)}
    assert first["train_loss"] == pytest.approx(first["val_loss"] + 1.0 / points[0].train_iters)


def test_a_point_that_exits_before_train_iters_gets_no_result(tmp_path, monkeypatch):
    out, points = planned_sweep(tmp_path)
    monkeypatch.setenv("FAKE_STOP", points[0].name)
    with pytest.raises(ConfigError, match=f"stopped at iteration {points[0].train_iters // 2} of"):
        main(["run", "--out", str(out), "--launcher", FAKE, "--index", "0"])
    assert runner.finished_results(out) == []


def test_slurm_array_runs_one_point_per_task(tmp_path, capsys):
    out, points = planned_sweep(tmp_path)
    main(["run", "--out", str(out), "--slurm", "--nproc", "8", "--sbatch-line=--partition=gpu"])
    script = (out / "scaling.sbatch").read_text()
    assert f"#SBATCH --array=0-{len(points) - 1}" in script
    assert "#SBATCH --partition=gpu" in script
    assert "--index $SLURM_ARRAY_TASK_ID" in script and "--nproc 8" in script
    assert script in capsys.readouterr().out
    main(["run", "--out", str(out), "--launcher", FAKE, "--index", "4"])  # what array task 4 runs
    assert calls(tmp_path) == [points[4].name]


def test_fit_and_predict_recover_the_sweeps_law_and_write_plots(tmp_path):
    out, points = planned_sweep(tmp_path, tokens="1280,2560,5120")
    for point in points:  # as `run` leaves them (the runs themselves are tested above)
        loss = float(TRUE.loss(point.params, point.tokens))
        result = {**point.to_dict(), "train_loss": loss, "val_loss": loss, "channels": {}}
        result["val_channels"] = {"en": loss - 0.1}
        runner.run_dir(out, point).mkdir(parents=True)
        write_json_atomic(runner.run_dir(out, point) / runner.RESULT_FILE, result)
    accuracies = {p.name: float(SIGMOID.accuracy(TRUE.loss(p.params, p.tokens))) for p in points}
    records = [{"id": str(i), "correct": i == 0} for i in range(4)]  # a tools.eval bench --out file: 0.25
    (tmp_path / "first.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    accuracies[points[0].name] = "first.jsonl"
    (tmp_path / "bench.json").write_text(json.dumps(accuracies))
    main(
        ["fit", "--out", str(out), "--bootstrap", "20", "--bench", str(tmp_path / "bench.json")]
        + ["--chance", "0.25"]
    )
    report = json.loads((out / "fit.json").read_text())
    assert report["law"]["alpha"] == pytest.approx(TRUE.alpha, rel=0.05)
    assert report["law"]["beta"] == pytest.approx(TRUE.beta, rel=0.05)
    assert set(report["channels"]) == {"en"}
    main(["predict", "--out", str(out), "--flops", "1e15"])
    prediction = json.loads((out / "prediction.json").read_text())
    n_opt, d_opt = TRUE.optimal_split(1e15)
    assert prediction["n_opt"] == pytest.approx(n_opt, rel=0.2)
    assert prediction["loss"] == pytest.approx(TRUE.loss(n_opt, d_opt), rel=0.01)
    low, high = prediction["loss_interval"]
    assert low <= prediction["loss"] <= high
    assert prediction["accuracy"] == pytest.approx(SIGMOID.accuracy(prediction["loss"]), abs=0.05)
    for png in ("loss_vs_compute.png", "residuals.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(["run", "--out", str(tmp_path / "none")]), PROG)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plan.json does not exist" in err
