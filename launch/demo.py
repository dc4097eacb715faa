"""`make demo`: the whole pipeline on CPU, from the shipped raw corpus to a HF model that generates.

1. data/preprocess: clean, desensitize, label, dedup, train a tokenizer, tokenize to .bin/.idx
2. train a small Llama on 2 gloo ranks (pipeline parallel) with per-channel loss (launch/pretrain_tiny.sh)
3. tools/convert mcore2hf: the last checkpoint -> a HuggingFace directory
4. generate a continuation per channel with `transformers`
5. plot the per-channel loss curves from TensorBoard to a PNG; print the probe scores per evaluation

With --moe (`make demo ARGS=--moe`), step 2 trains the DeepSeekMoE-style model scaled down
(launch/configs/demo_moe.yaml: fine-grained + shared experts, EP=2 on the 2 ranks) and the demo
plots its expert loads (the moe_load patch's heat map, and each layer's load spread over time)
instead of steps 3-4 (no converter family has its gateless shared expert with standard attention).

    python launch/demo.py [--out runs/demo] [--moe] [key=value ...]   # overrides go to the trainer
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROMPTS = {"zh": "中国的首都", "en": "The history of the", "code": "def main("}
PROGRESS = {"done": 0, "total": 5}  # steps printed so far, of the steps this demo runs


def step(title: str) -> None:
    PROGRESS["done"] += 1
    print(f"\n=== {PROGRESS['done']}/{PROGRESS['total']} {title}", flush=True)


def run(cmd: list[str], env: dict | None = None) -> None:
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, **(env or {})})


def preprocess(out: Path) -> Path:
    step("data/preprocess: raw JSONL -> tokenizer + .bin/.idx + blend.yaml")
    run(
        [
            sys.executable,
            "-m",
            "data.preprocess",
            "run",
            "--config",
            "data/demo/config.yaml",
            "--out",
            str(out),
        ]
    )
    return out / "tokenized" / "blend.yaml"


def train(blend: Path, run_dir: Path, overrides: list[str], moe: bool = False) -> None:
    if moe:
        step("train: DeepSeekMoE-style Megatron-Core MoE on 2 gloo ranks (EP=2), expert loads logged")
    else:
        step("train: Megatron-Core GPTModel on 2 gloo ranks (PP=2), channel loss on")
    info = yaml.safe_load(blend.read_text())
    tokenizer = (blend.parent / info["tokenizer"]).resolve()  # the probes patch tokenizes its file with it
    args = [
        f"data.blend={blend}",
        f"model.vocab_size={info['vocab_size']}",
        f"run_dir={run_dir}",
        *([] if moe else [f"patches.probes.tokenizer={tokenizer}"]),
        *overrides,
    ]
    config = REPO / "launch/configs" / ("demo_moe.yaml" if moe else "demo.yaml")
    env = {"NPROC": "2", "RUN_DIR": str(run_dir), "CONFIG": str(config)}
    run(["bash", "launch/pretrain_tiny.sh", *args], env=env)


def export(run_dir: Path, hf_dir: Path) -> None:
    step("tools/convert mcore2hf: last checkpoint -> HuggingFace directory")
    checkpoints = run_dir / "checkpoints"
    run(
        [
            sys.executable,
            "-m",
            "tools.convert",
            "mcore2hf",
            "--mcore",
            str(checkpoints),
            "--out",
            str(hf_dir),
            "--force",
        ]
    )


def generate(hf_dir: Path) -> None:
    step("generate with transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    for channel, prompt in PROMPTS.items():
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0], skip_special_tokens=True)
        print(f"[{channel}] {text!r}")


def plot(run_dir: Path, png: Path) -> None:
    step("plot per-channel loss; probe scores at each evaluation")
    from tools.eval import plots
    from tools.eval.trends import tensorboard_scalars

    plt = plots.pyplot()  # the Agg backend: no display needed
    scalars = tensorboard_scalars(run_dir / "tensorboard")  # the newest value per step (resumes)
    tags = sorted(t for t in scalars if t.startswith("channel_loss/")) + ["lm loss"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for tag in tags:
        points = scalars[tag]
        style = {"color": "black", "linewidth": 2} if tag == "lm loss" else {}
        ax.plot(list(points), list(points.values()), label=tag.removeprefix("channel_loss/"), **style)
    ax.set(xlabel="iteration", ylabel="loss (nats/token)", title="training loss per channel")
    ax.legend()
    ax.grid(alpha=0.3)
    plots.save(fig, png)
    for tag in sorted(t for t in scalars if t.startswith("probe/")):
        points = scalars[tag]
        trend = " -> ".join(f"{value:.2f}" for value in points.values())
        print(f"{tag} (iterations {min(points)}..{max(points)}): {trend}")


def plot_expert_loads(run_dir: Path, png: Path) -> None:
    """Each MoE layer's load spread (max / mean tokens per expert) over the run; the heat map is the
    moe_load patch's own, written at each checkpoint."""
    step("plot expert loads per MoE layer")
    from tools.eval import plots
    from tools.eval.trends import tensorboard_scalars

    plt = plots.pyplot()
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    tags = sorted(
        (t for t in scalars if t.startswith("moe/load_max_over_mean/")), key=lambda t: int(t.split("/")[-1])
    )
    fig, ax = plt.subplots(figsize=(8, 5))
    for tag in tags:
        points = scalars[tag]
        ax.plot(list(points), list(points.values()), label=f"layer {tag.split('/')[-1]}")
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")  # perfectly balanced
    ax.set(xlabel="iteration", ylabel="busiest expert's tokens / mean", title="expert load per MoE layer")
    ax.legend()
    ax.grid(alpha=0.3)
    plots.save(fig, png)
    for tag in tags:
        values = list(scalars[tag].values())
        print(f"{tag}: {values[0]:.2f} -> {values[-1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo", help="everything the demo writes goes here")
    parser.add_argument("--moe", action="store_true", help="train the small MoE and plot its expert loads")
    parser.add_argument("overrides", nargs="*", help="trainer key=value overrides, e.g. train_iters=100")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    start = time.monotonic()
    if args.moe:
        moe_demo(out, args.overrides)
        print(f"\nMoE demo done in {time.monotonic() - start:.0f} s.")
        return
    blend = preprocess(out / "data")
    train(blend, out / "train", args.overrides)
    export(out / "train", out / "hf")
    generate(out / "hf")
    plot(out / "train", out / "loss_per_channel.png")
    print(f"\nDemo done in {time.monotonic() - start:.0f} s.")
    print(f"  TensorBoard logs : tensorboard --logdir {out / 'train' / 'tensorboard'}")
    print(f"  checkpoint       : {out / 'train' / 'checkpoints'}")
    print(f"  HF export        : {out / 'hf'}")
    print(f"  loss plot        : {out / 'loss_per_channel.png'}")


def moe_demo(out: Path, overrides: list[str]) -> None:
    PROGRESS["total"] = 4
    blend = preprocess(out / "data")
    run_dir = out / "train_moe"
    train(blend, run_dir, overrides, moe=True)
    plot(run_dir, out / "loss_per_channel_moe.png")
    plot_expert_loads(run_dir, out / "expert_load_moe.png")
    print(f"  TensorBoard logs : tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"  expert loads     : {out / 'expert_load_moe.png'} (over time), {run_dir / 'expert_load.png'}")
    print(f"  loss plot        : {out / 'loss_per_channel_moe.png'}")


if __name__ == "__main__":
    main()
