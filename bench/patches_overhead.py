"""Iteration time of a tiny CPU config with all four patches on vs all off, in one run.

``python bench/patches_overhead.py [--preset tiny-long] [--iters 400] [--reps 2] [--ranks 2]``
starts ``--ranks`` gloo ranks (torchrun) that train a preset of ``bench/train_throughput.py``
(``tiny``: ``launch/configs/tiny.yaml``; ``tiny-long``: the same model on 1024-token
sequences, an iteration of realistic length) with one bench hook that owns the
four patches and calls them on odd iterations only: patches on and off alternate
every iteration, so both see the same machine load (this VM is shared; load
drifts over seconds). The time from one ``after_step`` to the next is one
iteration: its logging, checkpoint checks, forward/backward with the
per-micro-batch hooks, update, and ``after_step`` hooks. The first iterations
are dropped (warm-up), and so are the intervals holding the loop's manual
garbage collection (one in 100, always an 'off' one).

Printed first, the headline: the expected iteration on and off, each the
median plain iteration and the median logging iteration (every
``log_interval``: the console line, and with the patches the channel-loss
exchange) weighted as they occur. Medians per kind resist the VM's stalls;
one median over all iterations would not: a fifth of the 'on' iterations carry
the exchange (~2 ms), which moves the 'on' median up the spread of the plain
ones instead of adding a fifth of its cost. Then: medians and means over all
iterations, the median ratio of neighbouring on/off iterations, and the time
spent inside the patches' hooks (on iterations, mean and median).

"On" is: ``channel_loss``; ``save_trigger`` (rank 0 stats two files; the
answer reaches every rank in the loop's flags all-reduce, which runs on and off
alike); ``rope_schedule`` with one stage at the config's length and base, so
both kinds of iteration do the same arithmetic; ``loss_spike`` (action
``continue``). The save trigger's per-iteration check is also timed alone
(``--probes`` calls). ``--patches none`` switches nothing: its on/off ratio is
the method's own floor (odd against even iterations).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from train_throughput import (  # this directory is on sys.path (script or torchrun)
    PRESETS,
    global_batch,
    torchrun_worker,
)

REPO = Path(__file__).resolve().parents[1]
WARMUP = 10
PATCHES_ON = {
    "channel_loss": {},
    "save_trigger": {},
    "rope_schedule": {"stages": [{"seq_length": None, "rotary_base": 10000}]},  # the preset's length
    "loss_spike": {"action": "continue", "warmup": 5, "window": 50},
}
INTERVALS: list[tuple[int, float]] = []  # (0-based iteration, time its after_step hooks finished)
HOOK_SECONDS: dict[int, dict[str, float]] = {}  # 0-based iteration -> {patch: seconds inside its hooks}


@dataclass(frozen=True)
class Options:
    patches: dict = field(default_factory=dict)  # the 'on' patches and their options, as in a config


def enable(options: Options, config):
    """The ``bench_toggle`` patch: the patches in ``options``, called on odd iterations only."""
    from megatron_patches.hooks import Hook, build_hooks

    inner = build_hooks(options.patches, config)

    def on(index: int) -> bool:
        return index % 2 == 1

    def call(index: int, method: str, *args):
        """Call ``method`` of every patch if iteration ``index`` is an 'on' one; time it.

        'Off' iterations do the same timing bookkeeping around no call, so the
        bench's own cost falls on both sides of the ratio.
        """
        active = on(index)
        results, seconds = [], HOOK_SECONDS.setdefault(index, {})
        for hook in inner:
            start = time.perf_counter()
            if active:
                results.append(getattr(hook, method)(*args))
            seconds[hook.name] = seconds.get(hook.name, 0.0) + time.perf_counter() - start
        return results

    class Toggle(Hook):
        name = "bench_toggle"

        def plan_phases(self, phases, cfg):
            for hook in inner:
                phases = hook.plan_phases(phases, cfg)
            return phases

        def on_train_start(self, ctx) -> None:
            for hook in inner:
                hook.on_train_start(ctx)

        def on_phase_start(self, ctx, phase) -> None:
            for hook in inner:
                hook.on_phase_start(ctx, phase)

        def on_micro_batch_loss(self, ctx, *args) -> None:
            call(ctx.state.iteration, "on_micro_batch_loss", ctx, *args)

        flag_names = tuple(f"{hook.name}.{flag}" for hook in inner for flag in hook.flag_names)

        def rank0_flags(self, ctx) -> set[str]:
            answers = call(ctx.state.iteration, "rank0_flags", ctx)  # nothing on 'off' iterations
            named = zip(inner, answers, strict=False)
            return {f"{hook.name}.{flag}" for hook, flags in named for flag in flags}

        def skip_update(self, ctx, loss, grad_norm) -> bool:
            return any(call(ctx.state.iteration, "skip_update", ctx, loss, grad_norm))

        def after_step(self, ctx, report, requests) -> None:
            # The loop names flags "<this hook>.<inner patch>.<flag>"; the patches look for their own names.
            flags = {k.removeprefix(f"{self.name}."): v for k, v in report.flags.items()}
            call(report.iteration - 1, "after_step", ctx, dataclasses.replace(report, flags=flags), requests)
            INTERVALS.append((report.iteration - 1, time.perf_counter()))

        def on_log(self, ctx, metrics) -> None:
            call(ctx.state.iteration, "on_log", ctx, metrics)  # before 0-based `state.iteration` runs

        def after_save(self, ctx, path) -> None:
            for hook in inner:
                hook.after_save(ctx, path)

    return Toggle()


def preset_args(preset: str, ranks: int) -> list[str]:
    """``--config`` and the overrides of ``bench/train_throughput.py``'s ``preset`` for ``ranks`` ranks."""
    return [*PRESETS[preset], f"train.global_batch_size={global_batch(preset, ranks)}"]


def patches_on(names: list[str], seq_length: int) -> dict:
    """The options of the 'on' patches; the RoPE stage runs at the preset's own length and base."""
    chosen = {name: json.loads(json.dumps(PATCHES_ON[name])) for name in names}
    for stage in chosen.get("rope_schedule", {}).get("stages", []):
        stage["seq_length"] = seq_length
    return chosen


def _iteration_times(cfg, base_args: list[str], run_dir: Path, iters: int, patches: dict) -> dict[str, list]:
    from megatron_patches.training import run

    INTERVALS.clear()
    HOOK_SECONDS.clear()
    common = [f"run_dir={run_dir}", f"train.train_iters={iters}", "checkpoint.save_interval=null"]
    args = [*base_args, *common, "logging.eval_interval=null", "patches={}"]
    run.main([*args, f"patches.bench_toggle={json.dumps({'patches': patches})}"])
    times = {key: [] for key in ("off", "on", "pairs", "hooks", "off_log", "on_log", "off_plain", "on_plain")}
    times.update({name: [] for name in patches})
    previous_off = None
    for (_, start), (index, end) in zip(INTERVALS[WARMUP:], INTERVALS[WARMUP + 1 :], strict=False):
        # The loop logs after 1-based iteration k * log_interval, and collects garbage after
        # k * manual_gc_interval: inside the interval of 0-based iteration k * interval.
        if cfg.train.manual_gc and index % cfg.train.manual_gc_interval == 0:
            continue  # the same collection on both sides, but only ever in an 'off' interval
        seconds, side = end - start, "on" if index % 2 else "off"
        times[side].append(seconds)
        times[f"{side}_{'log' if index % cfg.logging.log_interval == 0 else 'plain'}"].append(seconds)
        if side == "off":
            previous_off = seconds
            continue
        inside = HOOK_SECONDS.get(index, {})
        times["hooks"].append(sum(inside.values()))
        for name in patches:
            times[name].append(inside.get(name, 0.0))
        if previous_off is not None:  # neighbours share the machine's load of the moment
            times["pairs"].append(seconds / previous_off)
    return times


def _trigger_check_seconds(probes: int, run_dir: Path) -> float:
    """Rank 0's two ``stat`` calls: all the save trigger adds (the loop shares its flags either way)."""
    from megatron_patches.save_trigger import requested

    save, stop = run_dir / "save", run_dir / "stop"
    start = time.perf_counter()
    for _ in range(probes):
        requested(save, stop)
    return (time.perf_counter() - start) / probes


def worker(out: Path, preset: str, reps: int, iters: int, probes: int, names: list[str]) -> None:
    import torch

    from megatron_patches import hooks, parallel
    from megatron_patches.training.config import load_config

    hooks.PATCHES["bench_toggle"] = "__main__"
    rank, world = parallel.init_distributed()
    base_args = preset_args(preset, world)
    cfg = load_config(base_args[1], base_args[2:])  # the intervals that tell logging and GC iterations apart
    patches = patches_on(names, cfg.data.seq_length)
    result = {}
    for rep in range(reps):
        times = _iteration_times(cfg, base_args, out / f"run{rep}", iters, patches)
        for key, values in times.items():
            result[key] = result.get(key, []) + values
        torch.distributed.barrier()
    result["log_interval"] = cfg.logging.log_interval
    result["trigger_check"] = _trigger_check_seconds(probes, out)
    if rank == 0:
        (out / "times.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def report(result: dict) -> str:
    off, on = result["off"], result["on"]
    med_off, med_on = statistics.median(off), statistics.median(on)
    mean_off, mean_on = statistics.fmean(off), statistics.fmean(on)
    pair = statistics.median(result["pairs"])
    hooks = statistics.fmean(result["hooks"])
    check = result["trigger_check"]

    def pct(ratio: float) -> str:
        return f"{ratio:.4f} ({(ratio - 1) * 100:+.2f}%)"

    every = result["log_interval"]
    medians = {
        f"{side}_{kind}": statistics.median(result[f"{side}_{kind}"])
        for side in ("off", "on")
        for kind in ("plain", "log")
    }

    def expected(side: str) -> float:
        """Median plain and median logging iteration, weighted as they occur (1 log in ``every``)."""
        return (medians[f"{side}_plain"] * (every - 1) + medians[f"{side}_log"]) / every

    def kind_line(kind: str) -> str:
        off_kind, on_kind = medians[f"off_{kind}"], medians[f"on_{kind}"]
        return (
            f"  {kind} iterations: median off {off_kind * 1e3:.2f} ms, on {on_kind * 1e3:.2f} ms "
            f"({(on_kind - off_kind) * 1e6:+.0f} us)"
        )

    exp_off, exp_on = expected("off"), expected("on")
    return "\n".join(
        [
            f"iterations timed: {len(off)} off, {len(on)} on (alternating)",
            f"expected iteration (median plain and median logging iteration, 1 log in {every}): "
            f"off {exp_off * 1e3:.2f} ms, on {exp_on * 1e3:.2f} ms: {pct(exp_on / exp_off)}",
            *(kind_line(kind) for kind in ("plain", "log")),
            f"median: off {med_off * 1e3:.2f} ms, on {med_on * 1e3:.2f} ms: {pct(med_on / med_off)}",
            f"mean:   off {mean_off * 1e3:.2f} ms, on {mean_on * 1e3:.2f} ms: {pct(mean_on / mean_off)}",
            f"median of on/off ratios of neighbouring iterations: {pct(pair)}",
            f"time inside the patches' hooks: {hooks * 1e6:.0f} us per iteration (mean), "
            f"{hooks / med_off * 100:.2f}% of a median iteration",
            *(
                f"  {name}: mean {statistics.fmean(result[name]) * 1e6:.0f} us, "
                f"median {statistics.median(result[name]) * 1e6:.0f} us"
                for name in PATCHES_ON
                if name in result
            ),
            f"save_trigger check alone (two stat calls on rank 0): {check * 1e6:.0f} us "
            f"({check / med_off * 100:.2f}% of a median iteration)",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("tiny", "tiny-long"), default="tiny")
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--probes", type=int, default=2000)
    parser.add_argument(
        "--patches",
        default=",".join(PATCHES_ON),
        help="the 'on' set (default: all four); 'none' times the method itself (odd vs even iterations)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [] if args.patches == "none" else args.patches.split(",")
    if args.worker:
        worker(Path(args.worker), args.preset, args.reps, args.iters, args.probes, names)
        return 0
    unknown = sorted(set(names) - set(PATCHES_ON))
    if unknown:
        parser.error(f"unknown patches {unknown}; choose from {sorted(PATCHES_ON)}")
    with tempfile.TemporaryDirectory() as tmp:
        worker_args = [
            *("--preset", args.preset, "--reps", str(args.reps), "--iters", str(args.iters)),
            *("--probes", str(args.probes)),
            f"--patches={args.patches}",
            f"--worker={tmp}",
        ]
        torchrun_worker(__file__, args.ranks, worker_args)
        print(f"preset {args.preset}, {args.ranks} ranks; on: {args.patches}")
        print(report(json.loads((Path(tmp) / "times.json").read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
