"""A stand-in for ``python -m megatron_patches.training`` in ``tools.scaling run`` tests.

It logs what the real trainer logs to TensorBoard (``lm loss`` each iteration,
``lm loss validation`` and channel losses at the end), with losses from
``losses.json`` beside this run's sweep (point name -> loss). A point named in
``FAKE_FAIL`` fails once, after logging half its iterations (a kill); one named
in ``FAKE_STOP`` exits 0 halfway (a `stop` file). Every call is appended to
``calls.txt`` beside the sweep.
"""

import json
import os
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


def main() -> int:
    overrides = dict(arg.split("=", 1) for arg in sys.argv[1:] if "=" in arg)
    run_dir = Path(overrides["run_dir"])
    sweep = run_dir.parents[1]
    name, iters = run_dir.name, int(overrides["train.train_iters"])
    with (sweep.parent / "calls.txt").open("a") as calls:
        calls.write(name + "\n")
    loss = json.loads((sweep.parent / "losses.json").read_text())[name]
    failing = name in os.environ.get("FAKE_FAIL", "") and not (run_dir / "failed_once").exists()
    stopping = name in os.environ.get("FAKE_STOP", "")
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    last = iters // 2 if failing or stopping else iters
    for step in range(1, last + 1):
        writer.add_scalar("lm loss", loss + 1.0 / step, step)
    if last == iters:
        writer.add_scalar("lm loss validation", loss, iters)
        writer.add_scalar("channel_loss/en", loss - 0.1, iters)
        writer.add_scalar("channel_val_loss/en", loss - 0.05, iters)
    writer.close()
    if failing:
        (run_dir / "failed_once").touch()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
