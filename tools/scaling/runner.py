"""``run``: train every grid point through the trainer's CLI, resumably, and collect its final losses.

Layout under the sweep directory ``OUT``::

    OUT/plan.json                      the grid (``plan``), read by run, fit, predict
    OUT/runs/<point>/                  the trainer's run_dir (checkpoints, tensorboard, metrics.jsonl)
    OUT/runs/<point>/scaling_result.json   written last, when the point reached train_iters:
                                       the finished marker, with the final losses

A point with its result file is skipped; any other point is (re)started with
the same overrides, so the trainer resumes it from its newest checkpoint. A
point that fails stops the sweep with one line naming it; running ``run``
again resumes there. Final losses come from the run's TensorBoard scalars:
``lm loss`` (the last logging window), ``lm loss validation`` and, with the
channel_loss patch, ``channel_loss/<name>`` and ``channel_val_loss/<name>``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_patches.errors import ConfigError
from megatron_patches.paths import write_json_atomic
from megatron_patches.tensorboard_scalars import tensorboard_scalars
from tools.scaling.plan import Point

PLAN_FILE = "plan.json"
RESULT_FILE = "scaling_result.json"


def save_plan(out: Path, base_config: Path, sets: list[str], points: list[Point]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plan = {
        "base_config": str(base_config.resolve()),
        "sets": sets,
        "points": [p.to_dict() for p in points],
    }
    write_json_atomic(out / PLAN_FILE, plan)
    return out / PLAN_FILE


def load_plan(out: Path) -> tuple[dict[str, Any], list[Point]]:
    path = out / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run `python -m tools.scaling plan --out {out} ...` first")
    try:
        plan = json.loads(path.read_text())
        return plan, [Point.from_dict(p) for p in plan["points"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is not a tools.scaling plan: {err}") from None


def run_dir(out: Path, point: Point) -> Path:
    return out / "runs" / point.name


def default_launcher(nproc: int) -> list[str]:
    """torchrun on this machine with ``nproc`` processes, then the trainer's module."""
    from megatron_patches.parallel import free_port

    return [
        sys.executable,
        *("-m", "torch.distributed.run", "--nproc_per_node", str(nproc)),
        *("--master_port", str(free_port()), "-m", "megatron_patches.training"),
    ]


def trainer_command(launcher: list[str], plan: dict[str, Any], point: Point, directory: Path) -> list[str]:
    overrides = [*plan["sets"], *point.overrides, f"run_dir={directory}"]
    return [*launcher, "--config", plan["base_config"], *overrides]


def run_points(
    out: Path, launcher: Callable[[], list[str]], only: list[int] | None = None, echo: Callable = print
) -> list[dict[str, Any]]:
    """Train the plan's points (all, or the indices ``only``) in order; return their results."""
    plan, points = load_plan(out)
    chosen = range(len(points)) if only is None else only
    results = []
    for index in chosen:
        if not 0 <= index < len(points):
            raise ConfigError(f"point index {index} is outside the plan's 0..{len(points) - 1}")
        point, directory = points[index], run_dir(out, points[index])
        if (directory / RESULT_FILE).is_file():
            echo(f"[{index + 1}/{len(points)}] {point.name}: finished before, skipped")
        else:
            echo(f"[{index + 1}/{len(points)}] {point.name}: N={point.params:,} D={point.tokens:,}")
            _train(launcher(), plan, point, directory)
            write_json_atomic(directory / RESULT_FILE, collect(point, directory))
        results.append(json.loads((directory / RESULT_FILE).read_text()))
    return results


def _train(launcher: list[str], plan: dict[str, Any], point: Point, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    code = subprocess.run(trainer_command(launcher, plan, point, directory), env=env).returncode
    if code:
        raise ConfigError(f"point {point.name} failed with exit status {code}; `run` again resumes it")


def collect(point: Point, directory: Path) -> dict[str, Any]:
    """The point's final losses from its TensorBoard logs; refused if it stopped before train_iters."""
    scalars = tensorboard_scalars(directory / "tensorboard")
    train = scalars.get("lm loss", {})
    if not train or max(train) != point.train_iters:
        reached = max(train) if train else 0
        raise ConfigError(
            f"point {point.name} stopped at iteration {reached} of {point.train_iters}: "
            "`run` again resumes it"
        )
    result = {**point.to_dict(), "train_loss": train[max(train)], "channels": {}, "val_channels": {}}
    validation = scalars.get("lm loss validation")
    result["val_loss"] = validation[max(validation)] if validation else None
    for tag, points in scalars.items():
        for prefix, key in (("channel_loss/", "channels"), ("channel_val_loss/", "val_channels")):
            if tag.startswith(prefix):
                result[key][tag.removeprefix(prefix)] = points[max(points)]
    return result


def finished_results(out: Path) -> list[dict[str, Any]]:
    """The results of every finished point of the plan in ``out`` (the ones still missing are left out)."""
    _, points = load_plan(out)
    files = [run_dir(out, p) / RESULT_FILE for p in points]
    return [json.loads(f.read_text()) for f in files if f.is_file()]


def sbatch_script(out: Path, count: int, gpus: int, header: list[str]) -> str:
    """A Slurm job array, one task per point; each task runs its point and writes its result."""
    repo = Path(__file__).resolve().parents[2]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --array=0-{count - 1}",
        "#SBATCH --nodes=1 --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --output={out.resolve()}/slurm-%A_%a.out",
        "#SBATCH --signal=USR1@120   # the trainer checkpoints and exits; a requeue resumes the point",
        *[f"#SBATCH {line}" for line in header],
        f"cd {shlex.quote(str(repo))}",
        f"{shlex.quote(sys.executable)} -m tools.scaling run --out {shlex.quote(str(out.resolve()))} "
        f"--nproc {gpus} --index $SLURM_ARRAY_TASK_ID",
    ]
    return "\n".join(lines) + "\n"
