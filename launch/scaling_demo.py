"""`make scaling-demo`: a scaling-law sweep on CPU, from the demo corpus to a prediction with plots.

1. the tokenized demo corpus (`make demo`'s step 1, reused; built only if missing)
2. tools.scaling plan: 3 widths x 3 token budgets of tiny Llamas (launch/configs/scaling_demo.yaml)
3. tools.scaling run: the 9 runs one after another on 2 gloo ranks (resumable: run it again after a kill)
4. tools.scaling fit: L(N, D) = E + A/N^alpha + B/D^beta with bootstrap intervals, per channel too
5. tools.scaling predict: compute-optimal N, D and loss at 100x the grid's largest run; PNG plots

    python launch/scaling_demo.py [--out runs/scaling-demo] [--data runs/demo/data]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import yaml
from demo import REPO, preprocess, run, step  # launch/demo.py, beside this script

WIDTHS = "16,32,64"  # 3k..92k non-embedding parameters: the range where size still matters here
TOKENS = "1.5e5,3e5,6e5"  # 146..585 iterations of 16 x 64 tokens


def scaling(*args: str) -> None:
    run([sys.executable, "-m", "tools.scaling", *args])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/scaling-demo", help="the sweep directory")
    parser.add_argument("--data", default="runs/demo/data", help="the demo corpus (shared with make demo)")
    args = parser.parse_args()
    out, data = (REPO / args.out).resolve(), (REPO / args.data).resolve()
    start = time.monotonic()
    blend = data / "tokenized" / "blend.yaml"
    if not blend.is_file():
        blend = preprocess(data)
    vocab = yaml.safe_load(blend.read_text())["vocab_size"]
    step("2/5 tools.scaling plan")
    config = str(REPO / "launch/configs/scaling_demo.yaml")
    sets = ["--set", f"data.blend={blend}", "--set", f"model.vocab_size={vocab}"]
    scaling("plan", "--config", config, "--out", str(out), "--widths", WIDTHS, "--tokens", TOKENS, *sets)
    step("3/5 tools.scaling run (2 gloo ranks per point)")
    scaling("run", "--out", str(out), "--nproc", "2")
    step("4/5 tools.scaling fit")
    scaling("fit", "--out", str(out), "--bootstrap", "100")
    step("5/5 tools.scaling predict")
    plan = json.loads((out / "plan.json").read_text())
    budget = 100 * max(6.0 * p["params"] * p["tokens"] for p in plan["points"])
    scaling("predict", "--out", str(out), "--flops", f"{budget:.3g}")
    print(f"\nScaling demo done in {time.monotonic() - start:.0f} s.")
    print(f"  plots: {out / 'loss_vs_compute.png'}, {out / 'residuals.png'}")


if __name__ == "__main__":
    main()
