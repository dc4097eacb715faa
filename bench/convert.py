"""Benchmark ``tools.convert`` on a synthetic Llama-2-7B (real shapes, random bf16).

Builds the HF checkpoint layer by layer (never whole in memory), copies its
bytes once as the baseline, then converts hf2mcore at TP=4 PP=2 (legacy rank
files) and to torch_dist, and each back with mcore2hf, each in its own process,
and prints wall time, throughput, peak RSS and the ratio to the plain copy
measured in this same run (dirty pages are flushed before each timed step, none
of which syncs itself). The round trips are checked byte for byte: the exported
files must equal the synthetic ones.

    python bench/convert.py                      # 32 layers: ~13.5 GB per copy, ~68 GB of disk at peak
    python bench/convert.py --layers 8           # same shapes, fewer layers
    python bench/convert.py --layers 8 --cold    # each step reads its inputs from disk, not the page cache
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


def settle(inputs: Path | None = None, cold: bool = False) -> None:
    """Flush dirty pages first, so no step pays for the previous step's writeback; ``cold``: also drop
    the step's inputs from the page cache (``posix_fadvise(DONTNEED)``), so it reads them from disk."""
    os.sync()
    if cold and inputs is not None:
        for path in (p for p in inputs.rglob("*") if p.is_file()):
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


def run_convert(*args: str, inputs: Path | None = None, cold: bool = False) -> tuple[float, str]:
    settle(inputs, cold)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-2-7B has 32)")
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--workdir", help="where to write (default: a temporary directory, removed after)")
    parser.add_argument("--cold", action="store_true", help="drop each step's inputs from the page cache")
    args = parser.parse_args()

    cfg = llama2_7b(args.layers)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        start = time.perf_counter()
        total = write_synthetic(cfg, work / "hf")
        print(f"synthetic Llama-2-7B shapes, {args.layers} layers: {human_bytes(total)} bf16 written in "
              f"{time.perf_counter() - start:.1f} s")  # fmt: skip
        copy_s = timed_copy(work / "hf", work / "copy", args.cold)
        shutil.rmtree(work / "copy")
        steps = []
        for name, fmt_args in (
            (f"legacy TP{args.tp} PP{args.pp}", ("--tp", str(args.tp), "--pp", str(args.pp))),
            ("torch_dist", ("--format", "torch_dist")),
        ):
            mcore = work / name.split()[0]
            back = work / f"back-{mcore.name}"
            to_mcore = ("hf2mcore", "--hf", str(work / "hf"), "--out", str(mcore), *fmt_args)
            steps.append((f"hf2mcore {name}", *run_convert(*to_mcore, inputs=work / "hf", cold=args.cold)))
            to_hf = ("mcore2hf", "--mcore", str(mcore), "--out", str(back))
            steps.append((f"mcore2hf from {mcore.name}", *run_convert(*to_hf, inputs=mcore, cold=args.cold)))
        exact = all(same_files(work / "hf", back) for back in work.glob("back-*"))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    gib = total / (1 << 30)
    print(f"{'step':<28}{'wall s':>9}{'GiB/s':>9}{'x copy':>9}   peak RSS")
    print(f"{'plain file copy (baseline)':<28}{copy_s:>9.1f}{gib / copy_s:>9.2f}{1.0:>9.2f}   -")
    for label, seconds, summary in steps:
        print(
            f"{label:<28}{seconds:>9.1f}{gib / seconds:>9.2f}{seconds / copy_s:>9.2f}   {peak_rss(summary)}"
        )
    print(f"round trips byte-identical: {exact}")
    for _, _, summary in steps:
        print(summary)
    if not exact:
        raise SystemExit("round trip differs")


if __name__ == "__main__":
    main()
