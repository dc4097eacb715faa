"""``python -m tools.scaling plan|run|fit|predict``: the scaling-law sweep, one sweep directory ``--out``.

plan     --config BASE.yaml --out OUT --widths 64,96,128 --tokens 2e5,4e5,8e5   (or --flops 1e12,3e12)
run      --out OUT [--nproc 2] [--launcher CMD] [--index I ...] [--slurm]
fit      --out OUT [--loss val|train] [--bootstrap 200] [--bench ACC.yaml --chance 0.25]
predict  --out OUT --flops 1e21
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from megatron_patches.config_io import read_yaml
from megatron_patches.errors import ConfigError
from megatron_patches.paths import write_json_atomic, write_text_atomic
from tools.scaling import analysis, plan, plots, runner
from tools.scaling.benchmark import read_accuracy

PROG = "python -m tools.scaling"
FIT_FILE = "fit.json"
PREDICTION_FILE = "prediction.json"
NOT_FITTED = {  # why a fit the grid may allow is absent
    "isoflop": "no two compute budgets with 3+ sizes and a minimum inside them",
    "lr_law": "the grid does not vary the learning rate at two budgets",
    "batch_tokens_law": "the grid does not vary the batch size at two budgets",
    "benchmark": "no --bench accuracies given",
}


def _numbers(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(float(item)) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None

    return parse


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="the grid of sizes x token (or compute) budgets, FLOPs per run")
    p.add_argument("--config", type=Path, required=True, help="base trainer config (YAML)")
    p.add_argument("--out", type=Path, required=True, help="sweep directory")
    p.add_argument("--widths", type=_numbers(int), required=True, help="hidden sizes, e.g. 64,96,128")
    p.add_argument("--tokens", type=_numbers(float), default=[], help="token budgets per size")
    p.add_argument("--flops", type=_numbers(float), default=[], help="IsoFLOP compute budgets instead")
    p.add_argument("--lrs", type=_numbers(float), default=[], help="learning rates (default: the base's)")
    p.add_argument(
        "--batches", type=_numbers(int), default=[], help="global batch sizes (default: the base's)"
    )
    p.add_argument(
        "--min-iters", type=int, default=10, help="IsoFLOP points with fewer iterations are dropped"
    )
    p.add_argument("--set", action="append", default=[], help="section.key=value for every run")
    r = sub.add_parser("run", help="train the grid's points (resumable), or print a Slurm job array")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun)")
    r.add_argument(
        "--launcher",
        help="command that starts the trainer (default: torchrun ... -m megatron_patches.training)",
    )
    r.add_argument(
        "--index", type=int, action="append", help="only this point (repeatable; a Slurm array task)"
    )
    r.add_argument(
        "--slurm", action="store_true", help="write OUT/scaling.sbatch and print it instead of running"
    )
    r.add_argument(
        "--sbatch-line", action="append", default=[], help="extra #SBATCH line, e.g. --partition=gpu"
    )
    f = sub.add_parser("fit", help="approach 3 (+ bootstrap), approach 2, LR/batch laws, channels, benchmark")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--loss", choices=sorted(analysis.LOSS_KEYS), default="val")
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    f.add_argument(
        "--bench", type=Path, help="YAML/JSON: point name -> accuracy or a tools.eval bench --out file"
    )
    f.add_argument("--chance", type=float, help="the benchmark's chance accuracy (default: fitted)")
    q = sub.add_parser("predict", help="compute-optimal N, D, loss (and accuracy) at a budget; PNG plots")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--flops", type=float, required=True, help="compute budget C in FLOPs (C = 6ND)")
    q.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return {"plan": cmd_plan, "run": cmd_run, "fit": cmd_fit, "predict": cmd_predict}[args.command](args)


def cmd_plan(args: argparse.Namespace) -> int:
    raw = plan.apply_sets(read_yaml(args.config), args.set)
    spec = plan.GridSpec(args.widths, args.tokens, args.flops, args.lrs, args.batches, args.min_iters)
    points = plan.plan_grid(raw, spec)
    if (args.out / runner.PLAN_FILE).is_file():
        _, existing = runner.load_plan(args.out)
        if [p.to_dict() for p in existing] != [p.to_dict() for p in points]:
            raise ConfigError(f"{args.out} already holds a different plan: choose another --out")
    runner.save_plan(args.out, args.config, args.set, points)
    columns = ("layers", 6), ("hidden", 6), ("heads", 5), ("N", 12), ("D", 12), ("6ND", 10), ("FLOPs", 10)
    print(f"{'point':<34} " + " ".join(f"{name:>{width}}" for name, width in columns))
    for p in points:
        s = p.shape
        print(
            f"{p.name:<34} {s.num_layers:>6} {s.hidden_size:>6} {s.num_attention_heads:>5} {p.params:>12,} "
            f"{p.tokens:>12,} {p.flops_6nd:>10.3g} {p.flops:>10.3g}"
        )
    total = sum(p.flops for p in points)
    print(f"{len(points)} points; total {total:.3g} FLOPs -> {args.out / runner.PLAN_FILE}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if args.slurm:
        _, points = runner.load_plan(args.out)
        script = runner.sbatch_script(args.out, len(points), args.nproc, args.sbatch_line)
        path = args.out / "scaling.sbatch"
        write_text_atomic(path, script)
        print(script + f"# written to {path}: sbatch {path}")
        return 0
    if args.launcher:
        launcher = lambda: shlex.split(args.launcher)
    else:
        launcher = lambda: runner.default_launcher(args.nproc)
    results = runner.run_points(args.out, launcher, args.index)
    print(f"{len(results)} points finished; next: {PROG} fit --out {args.out}")
    return 0


def _accuracies(path: Path | None) -> dict[str, float] | None:
    if path is None:
        return None
    scores = {}
    for name, value in read_yaml(path).items():  # JSON is YAML
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scores[name] = float(value)
        elif isinstance(value, str):
            scores[name] = read_accuracy(path.parent / value)  # a records file, beside the mapping
        else:
            raise ConfigError(f"{path}: {name} must be an accuracy or a bench records file, got {value!r}")
    return scores


def cmd_fit(args: argparse.Namespace) -> int:
    results = runner.finished_results(args.out)
    _, points = runner.load_plan(args.out)
    what = f"{args.loss} loss, {args.bootstrap} bootstrap samples"
    print(f"fitting {len(results)} of {len(points)} points ({what})")
    report = analysis.fit_report(results, args.loss, args.bootstrap, _accuracies(args.bench), args.chance)
    write_json_atomic(args.out / FIT_FILE, report)
    law, ci = report["law"], report["intervals"]
    for key in analysis.LAW_FIELDS:
        print(f"  {key:<6} {law[key]:.4g}   95% CI [{ci[key][0]:.4g}, {ci[key][1]:.4g}]")
    for key, missing in NOT_FITTED.items():
        print(f"  {key}: {json.dumps(report[key]) if report[key] else 'not fitted: ' + missing}")
    for name, channel in report["channels"].items():
        print(f"  channel {name}: {channel}")
    print(f"-> {args.out / FIT_FILE}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    path = args.out / FIT_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run `{PROG} fit --out {args.out}` first")
    try:
        report = json.loads(path.read_text())
        prediction = analysis.predict(report, args.flops, args.level)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is not a tools.scaling fit ({err}): run fit again") from None
    write_json_atomic(args.out / PREDICTION_FILE, prediction)
    results = runner.finished_results(args.out)
    plots.plot_frontier(results, report, prediction, args.out / "loss_vs_compute.png")
    plots.plot_residuals(results, report, args.out / "residuals.png")
    for key, value in prediction.items():
        print(f"  {key:<18} {value}")
    print(
        f"-> {args.out / PREDICTION_FILE}, {args.out / 'loss_vs_compute.png'}, {args.out / 'residuals.png'}"
    )
    return 0
