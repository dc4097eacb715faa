"""What the MoE load logging (``patches.moe_load``) costs per iteration, against the iteration, in one run.

``python bench/moe_load_overhead.py [--preset tiny-long-moe] [--iters 60] [--ranks 2]`` trains the
MoE twin of a ``bench/train_throughput.py`` preset on ``--ranks`` gloo ranks (torchrun) with the
patch on and times, on every rank, everything it does: the forward hook on each router (counting
tokens per expert), ``on_log`` every ``log_interval`` (its all-reduce, the statistics and the
collapse check; timed after an untimed barrier, so waiting for a slower rank, which the loop's own
collectives would do anyway, is not charged to it) and the heat map at the checkpoint (reported per
checkpoint). It prints the mean time inside the patch per iteration, the median iteration (after
``--warmup``) and their ratio: the patch's overhead against the iteration it rides on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import wraps
from pathlib import Path

from train_throughput import (  # this directory is on sys.path (script or torchrun)
    PRESETS,
    global_batch,
    torchrun_worker,
)

REPO = Path(__file__).resolve().parents[1]
SECONDS: dict[str, float] = {"_count": 0.0, "on_log": 0.0, "after_save": 0.0}


def _timed(cls, name: str, align: bool) -> None:
    """Wrap ``cls.name`` so that its time adds to ``SECONDS[name]``; ``align``: after an untimed barrier,
    so that a collective inside is not charged with waiting for a slower rank (the loop's own
    collectives would wait for it anyway)."""
    import torch

    original = getattr(cls, name)

    @wraps(original)
    def timed(*args, **kwargs):
        if align:
            torch.distributed.barrier()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SECONDS[name] += time.perf_counter() - start

    setattr(cls, name, timed)


def worker(out: Path, preset: str, iters: int) -> None:
    import torch

    from megatron_patches import moe_load, parallel
    from megatron_patches.training import run

    for name in SECONDS:
        _timed(moe_load.MoeLoad, name, align=name == "on_log")
    rank, world = parallel.init_distributed()
    args = [
        *PRESETS[preset][2:],
        f"train.global_batch_size={global_batch(preset, world)}",
        f"run_dir={out}",
        f"train.train_iters={iters}",
        "checkpoint.save_interval=null",  # one checkpoint, at the end: one heat map
        "logging.eval_interval=null",
        "patches.moe_load={}",
    ]
    assert run.main(["--config", PRESETS[preset][1], *args]) == 0
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, dict(SECONDS))
    if rank == 0:
        (out / "seconds.json").write_text(json.dumps(gathered))
    torch.distributed.destroy_process_group()


def report(out: Path, iters: int, warmup: int) -> str:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    iteration = statistics.median([r["seconds"] for r in records][warmup:])
    per_rank = json.loads((out / "seconds.json").read_text())
    lines = [f"median iteration: {iteration * 1e3:.1f} ms (iterations {warmup + 1}..{iters})"]
    worst = 0.0
    for rank, seconds in enumerate(per_rank):
        inside = (seconds["_count"] + seconds["on_log"]) / iters
        worst = max(worst, inside)
        lines.append(
            f"rank {rank}: {inside * 1e6:.0f} us per iteration inside moe_load (router hooks "
            f"{seconds['_count'] / iters * 1e6:.0f} us, on_log {seconds['on_log'] / iters * 1e6:.0f} us); "
            f"heat map {seconds['after_save'] * 1e3:.0f} ms per checkpoint"
        )
    lines.append(f"overhead: {worst / iteration:.2%} of an iteration (the busiest rank, heat maps apart)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("tiny-moe", "tiny-long-moe"), default="tiny-long-moe")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.preset, args.iters)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        worker_args = ["--preset", args.preset, "--iters", str(args.iters), f"--worker={tmp}"]
        torchrun_worker(__file__, args.ranks, worker_args)
        print(f"preset {args.preset}, {args.ranks} ranks, patches.moe_load on")
        print(report(Path(tmp), args.iters, args.warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
