"""Training throughput of the real trainer, per attention backend, measured in one run.

    python bench/train_throughput.py                    # tiny config on CPU, 2 gloo ranks
    python bench/train_throughput.py --preset tiny-long # the same at 1024-token sequences
    python bench/train_throughput.py --preset 1b        # ~1.1B Llama on the local GPUs (bf16)
    python bench/train_throughput.py --preset tiny-moe  # MoE vs its dense twin at equal active params

A MoE preset (``*-moe``) is measured side by side with its dense twin (the preset without
``-moe``): the same model whose routed experts (8, top-2, each half the dense FFN) give every
token the dense FFN's width, so both do the same active work; the ratio column is then MoE
against dense, per backend, measured in the same run.

Each backend trains the same config for --iters iterations through torchrun;
the median iteration time after --warmup iterations gives tokens/s, tokens/s
per rank and, on a GPU, MFU. The ratio column compares every backend to
Megatron-Core's unfused DotProductAttention measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {
    "tiny": ["--config", str(REPO / "launch/configs/tiny.yaml"), "data.mock=true"],
    # The same model on 1024-token sequences, where attention is a large share of the work on CPU.
    "tiny-long": [
        "--config",
        str(REPO / "launch/configs/tiny.yaml"),
        "data.mock=true",
        "data.seq_length=1024",
        "model.max_position_embeddings=1024",
        "train.micro_batch_size=1",
    ],
    # TinyLlama-1.1B shape: 22 layers, 2048 hidden, 32 heads / 4 KV groups, 5632 FFN.
    "1b": [
        "--config",
        str(REPO / "launch/configs/llama2_7b.yaml"),
        "data.mock=true",
        "patches={}",
        "parallel.sequence_parallel=null",  # the 7B config's SP needs TP > 1; null: on where TP > 1
        "model.num_layers=22",
        "model.hidden_size=2048",
        "model.ffn_hidden_size=5632",
        "model.num_attention_heads=32",
        "model.num_query_groups=4",
        "data.seq_length=2048",
        "train.micro_batch_size=4",
        "logging.eval_interval=null",
    ],
}
# MoE twins of the tiny presets at equal active parameters: 8 routed experts of half the dense FFN (176),
# top-2, expert-parallel over the 2 ranks (4 experts each), alltoall dispatch, aux loss on.
MOE_OVERRIDES = [
    "model.num_moe_experts=8",
    "model.moe_router_topk=2",
    "model.moe_ffn_hidden_size=88",
    "model.moe_aux_loss_coeff=0.01",
    "model.moe_token_dispatcher_type=alltoall",
    "parallel.expert_model_parallel_size=2",
]
PRESETS["tiny-moe"] = [*PRESETS["tiny"], *MOE_OVERRIDES]
PRESETS["tiny-long-moe"] = [*PRESETS["tiny-long"], *MOE_OVERRIDES]


def torchrun_worker(script: str, ranks: int, args: list[str]) -> None:
    """Run a bench ``script`` in its worker mode (``args``) on ``ranks`` local torchrun ranks, quietly."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    subprocess.run([*command, script, *args], check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)


def dense_twin(preset: str) -> str | None:
    """The dense preset a MoE preset is compared with (equal active parameters), else None."""
    return preset.removesuffix("-moe") if preset.endswith("-moe") else None


def run_backend(preset: str, backend: str, iters: int, nproc: int, workdir: Path) -> list[float]:
    impl = "transformer_engine" if backend == "te" else "local"
    attention = "auto" if backend == "te" else backend
    run_dir = workdir / f"{preset}-{backend}"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "megatron_patches.training",
        *PRESETS[preset],
        f"run_dir={run_dir}",
        f"train.train_iters={iters}",
        f"model.transformer_impl={impl}",
        f"model.attention_backend={attention}",
        f"logging.log_interval={iters}",
        "checkpoint.save_interval=null",
        "checkpoint.save_at_end=false",
        "logging.eval_interval=null",
        f"train.global_batch_size={global_batch(preset, nproc)}",
    ]
    subprocess.run(
        cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in records]


def peak_memory_gib(run_dir: Path) -> float | None:
    """The last rank's peak allocated GPU memory, as the trainer logged it (None on CPU)."""
    from megatron_patches.tensorboard_scalars import tensorboard_scalars

    series = tensorboard_scalars(run_dir / "tensorboard").get("peak-memory-gib", {})
    return max(series.values(), default=None)


def planned_memory_gib(cfg, nproc: int) -> float:
    """The memory plan's total per GPU for the preset (what `--dry-run` prints), in GiB."""
    from megatron_patches.parallel import Layout
    from megatron_patches.training.data import Phase
    from megatron_patches.training.memory_budget import run_plans
    from megatron_patches.training.memory_plan import GIB

    train, parallel = cfg.train, cfg.parallel
    layout = Layout(
        nproc,
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
    )
    phase = Phase(
        "main", 0, train.train_iters, (), cfg.data.seq_length, train.global_batch_size, train.micro_batch_size
    )
    return max(plan.total for _, _, plan in run_plans(cfg, layout, [phase])) / GIB


def global_batch(preset: str, nproc: int) -> int:
    return {"tiny": 8, "tiny-long": 4}.get(dense_twin(preset) or preset, 4 * nproc * 8)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=None, help="ranks (default: GPUs, or 2 on CPU)")
    parser.add_argument("--backends", default=None, help="comma list of unfused,sdpa,te")
    args = parser.parse_args()

    import torch

    from megatron_patches.training.model import transformer_engine_available

    gpus = torch.cuda.device_count()
    nproc = args.nproc or (gpus if gpus else 2)
    backends = (
        args.backends.split(",")
        if args.backends
        else ["unfused", "sdpa"] + (["te"] if gpus and transformer_engine_available() else [])
    )
    presets = [p for p in (dense_twin(args.preset), args.preset) if p]  # a MoE preset after its twin
    configs = {preset: preset_config(preset, nproc) for preset in presets}
    cfg = configs[args.preset]
    tokens = cfg.train.global_batch_size * cfg.data.seq_length
    device = torch.cuda.get_device_name() if gpus else f"CPU ({os.cpu_count()} cores)"
    print(
        f"preset {args.preset} on {device}, {nproc} ranks, {tokens} tokens/iteration, "
        f"median of iterations {args.warmup + 1}..{args.iters}"
    )
    versus = "vs dense" if len(presets) > 1 else "vs unfused"  # MoE: against the twin, same backend
    header = ("preset", "backend", "s/iter", "tokens/s", "tok/s/rank", "MFU", versus, "peak GiB", "plan GiB")
    print("{:14s} {:10s} {:>9s} {:>11s} {:>11s} {:>6s} {:>10s} {:>8s} {:>8s}".format(*header))
    baselines: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            for preset in presets:
                times = run_backend(preset, backend, args.iters, nproc, Path(tmp))
                seconds = statistics.median(times[args.warmup :])
                key = backend if len(presets) > 1 else "first"
                baselines.setdefault(key, seconds)
                measured = peak_memory_gib(Path(tmp) / f"{preset}-{backend}")
                row = throughput_row(configs[preset], seconds, nproc, baselines[key] / seconds)
                print(
                    f"{preset:14s} {backend:10s} {row} "
                    f"{'n/a' if measured is None else f'{measured:.2f}':>8s} "
                    f"{planned_memory_gib(configs[preset], nproc):8.2f}"
                )


def preset_config(preset: str, nproc: int):
    """The trainer config ``preset`` runs with on ``nproc`` ranks."""
    from megatron_patches.training.config import load_config
    from megatron_patches.training.run import parse_args

    parsed = parse_args(PRESETS[preset][2:] + [f"train.global_batch_size={global_batch(preset, nproc)}"])
    return load_config(PRESETS[preset][1], parsed.overrides)


def throughput_row(cfg, seconds: float, nproc: int, ratio: float) -> str:
    """s/iter, tokens/s, tokens/s per rank, MFU (active parameters for MoE) and the ratio column."""
    from megatron_patches.training.metrics import flops_per_iteration, peak_flops_per_gpu

    tokens = cfg.train.global_batch_size * cfg.data.seq_length
    peak = peak_flops_per_gpu()
    flops = flops_per_iteration(cfg.model, cfg.data.seq_length, cfg.train.global_batch_size)
    mfu = f"{flops / seconds / nproc / peak:6.1%}" if peak else "   n/a"
    return f"{seconds:9.4f} {tokens / seconds:11,.0f} {tokens / seconds / nproc:11,.0f} {mfu} {ratio:9.2f}x"


if __name__ == "__main__":
    main()
