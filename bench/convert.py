"""Benchmark ``tools.convert`` on a synthetic Llama-2-7B (real shapes, random bf16) against a plain copy.

Builds the HF checkpoint layer by layer (never whole in memory), then, for each cache
state asked for (warm: inputs in the page cache; cold: each step's inputs dropped from
it first with ``posix_fadvise(DONTNEED)``), times a plain copy of the same bytes
(``shutil.copytree``: in-kernel ``sendfile``) and, each as its own
``python -m tools.convert`` process (start-up included), hf2mcore at TP=4 PP=2 (legacy
rank files) and to torch_dist, and mcore2hf back from each. Dirty pages are flushed
before every timed step, none of which syncs itself, and files a step does not read
(the synthetic model, while mcore2hf reads the checkpoint) are dropped from the page
cache, so that every step finds the free memory the copy found. Each round trip must give back
the synthetic files byte for byte; its outputs are deleted before the next step, so
the disk holds at most three copies (~40 GB at 32 layers). Every row shows the load
average when it ran: on a shared machine, compare ratios from one run only.

    python bench/convert.py                        # 32 layers (12.55 GiB), warm and cold, ~10 min quiet
    python bench/convert.py --cache warm           # one cache state
    python bench/convert.py --layers 8             # same shapes, fewer layers
    python bench/convert.py --workdir /big/disk    # kept: a rerun reuses its synthetic model

For a figure to publish, run it on a quiet machine (load average below 1) with the
default arguments, and quote the ratio column.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_patches.formats.model_config import ModelConfig  # noqa: E402
from tools.convert import layout  # noqa: E402
from tools.convert.families import LLAMA  # noqa: E402
from tools.convert.hf_io import ShardedSafetensorsWriter  # noqa: E402
from tools.convert.progress import human_bytes  # noqa: E402

SHARD_BYTES = 5 << 30


def llama2_7b(layers: int) -> ModelConfig:
    return ModelConfig(
        num_layers=layers,
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_attention_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        norm_epsilon=1e-5,
    )


def hf_plan(cfg: ModelConfig) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """HF names and shapes in the order the exporter writes them, so files compare byte for byte."""
    shapes = layout.canonical_shapes(cfg)
    plan = []
    for entry, layer in LLAMA.expand(cfg):
        mcore, names = entry.at(layer)
        metas = entry.to_hf(torch.empty(shapes[mcore], device="meta"), cfg)
        plan += [(name, torch.bfloat16, tuple(meta.shape)) for name, meta in zip(names, metas, strict=True)]
    return plan


def write_synthetic(cfg: ModelConfig, directory: Path) -> int:
    """Random bf16 tensors streamed into HF shards; one pool of random values, sliced per tensor."""
    import json

    directory.mkdir(parents=True)
    config = LLAMA.write_config(cfg, {}, torch.bfloat16)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    plan = hf_plan(cfg)
    largest = max(torch.Size(shape).numel() for _, _, shape in plan)
    pool = torch.randn(largest + (1 << 20), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    writer = ShardedSafetensorsWriter(directory, plan, SHARD_BYTES)
    for n, (name, _, shape) in enumerate(plan):
        start = (n * 7919) % (1 << 20)
        writer.write(name, pool[start : start + torch.Size(shape).numel()].view(shape))
    writer.close()
    return writer.total_bytes


def settle(inputs: Path | None = None, cold: bool = False, idle: Path | None = None) -> None:
    """Flush dirty pages first, so no step pays for the previous step's writeback; ``cold``: also drop
    the step's inputs from the page cache (``posix_fadvise(DONTNEED)``), so it reads them from disk.
    ``idle``: files the step does not read, dropped too, so that it finds as much free memory for its
    output as the copy did (at 32 layers, the synthetic model and the checkpoint read from fill RAM)."""
    os.sync()
    for directory in ([inputs] if cold and inputs is not None else []) + ([idle] if idle else []):
        for path in (p for p in directory.rglob("*") if p.is_file()):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed_copy(source: Path, target: Path, cold: bool = False) -> float:
    settle(source, cold)
    start = time.perf_counter()
    shutil.copytree(source, target)
    return time.perf_counter() - start


def run_convert(
    *args: str, inputs: Path | None = None, cold: bool = False, idle: Path | None = None
) -> tuple[float, str]:
    settle(inputs, cold, idle)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tools.convert", *args, "--quiet"], cwd=REPO, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"conversion failed:\n{done.stderr}")
    return seconds, done.stdout.strip()


def peak_rss(summary: str) -> str:
    match = re.search(r"peak RSS (.+)$", summary)
    return match.group(1) if match else "?"


def same_files(left: Path, right: Path) -> bool:
    names = sorted(p.name for p in left.glob("*.safetensors"))
    return names == sorted(p.name for p in right.glob("*.safetensors")) and all(
        filecmp.cmp(left / name, right / name, shallow=False) for name in names
    )


STEPS = (
    ("legacy", lambda a: ("--tp", str(a.tp), "--pp", str(a.pp))),
    ("torch_dist", lambda a: ("--format", "torch_dist")),
)


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def measure(work: Path, args: argparse.Namespace, cold: bool) -> list[tuple[str, float, str, str]]:
    """(label, seconds, peak RSS, load average) of the copy and each conversion; outputs deleted after."""
    rows = [("plain file copy (baseline)", timed_copy(work / "hf", work / "copy", cold), "-", load())]
    shutil.rmtree(work / "copy")
    for name, fmt_args in STEPS:
        mcore, back = work / name, work / f"back-{name}"
        label = f"legacy TP{args.tp} PP{args.pp}" if name == "legacy" else name
        to_mcore = ("hf2mcore", "--hf", str(work / "hf"), "--out", str(mcore), *fmt_args(args))
        seconds, summary = run_convert(*to_mcore, inputs=work / "hf", cold=cold)
        rows.append((f"hf2mcore {label}", seconds, peak_rss(summary), load()))
        seconds, summary = run_convert(
            "mcore2hf", "--mcore", str(mcore), "--out", str(back), inputs=mcore, cold=cold, idle=work / "hf"
        )
        rows.append((f"mcore2hf from {name}", seconds, peak_rss(summary), load()))
        if not same_files(work / "hf", back):
            raise SystemExit(f"round trip through {name} differs from the synthetic model")
        shutil.rmtree(mcore)
        shutil.rmtree(back)
    return rows


def print_table(title: str, rows: list[tuple[str, float, str, str]], gib: float) -> None:
    copy_s = rows[0][1]
    print(f"\n{title}")
    print(f"{'step':<30}{'wall s':>8}{'GiB/s':>8}{'x copy':>8}  {'peak RSS':<11}load 1/5/15 min")
    for label, seconds, rss, when in rows:
        print(f"{label:<30}{seconds:>8.1f}{gib / seconds:>8.2f}{seconds / copy_s:>8.2f}  {rss:<11}{when}")


def synthetic(cfg: ModelConfig, hf: Path, layers: int) -> int:
    """The synthetic model's bytes: written now, or found from an earlier run in the same --workdir."""
    if (hf / "config.json").is_file():
        return sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    start = time.perf_counter()
    total = write_synthetic(cfg, hf)
    print(f"synthetic Llama-2-7B shapes, {layers} layers: {human_bytes(total)} bf16 written in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-2-7B has 32)")
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument(
        "--workdir", help="where to write and keep the synthetic model (default: a temporary dir)"
    )
    parser.add_argument("--cache", choices=("warm", "cold", "both"), default="both", help="page-cache state")
    parser.add_argument("--cold", dest="cache", action="store_const", const="cold", help="--cache cold")
    args = parser.parse_args()

    cfg = llama2_7b(args.layers)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        total = synthetic(cfg, work / "hf", args.layers)
        states = ("warm", "cold") if args.cache == "both" else (args.cache,)
        tables = [(state, measure(work, args, state == "cold")) for state in states]
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    gib = total / (1 << 30)
    for state, rows in tables:
        print_table(f"{state} cache, {human_bytes(total)} ({os.cpu_count()} CPUs):", rows, gib)
    print("round trips byte-identical: True")


if __name__ == "__main__":
    main()
