"""``python -m tools.eval ppl --checkpoints RUN_DIR``: per-channel loss across a run's checkpoints.

Pretraining evaluation is about trends: this walks a run directory for HF
exports (any directory with ``config.json`` and weights whose name carries the
iteration: ``iter_0001000``, ``checkpoint-1000``, ``step_1000``) and Megatron
checkpoints (``iter_XXXXXXX`` with ``metadata.json`` or ``mp_rank_*``). An
iteration with an export is evaluated from it; one with only a Megatron
checkpoint is converted on the fly with ``--convert`` (into
``<run>/hf/iter_XXXXXXX``, through :func:`megatron_to_hf`), else listed as
skipped. Results go to ``ppl.csv`` (iteration, channel, tokens, loss, ppl) and
``ppl.png`` (loss per channel against iteration), both written atomically.

:func:`tensorboard_scalars` reads the training curves a run logged to TensorBoard,
keeping the newest value of each step (a resumed run logs again the steps its
predecessor logged past the checkpoint).
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_patches import paths
from megatron_patches.errors import ConfigError
from megatron_patches.formats import checkpoint as ckpt_format
from megatron_patches.tensorboard_scalars import tensorboard_scalars  # noqa: F401 - re-exported
from tools.eval import plots
from tools.eval.ppl import ChannelResult

ITERATION = re.compile(r"(?:iter_|checkpoint-|step[_-]?)(\d+)$")
WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
# The converter's command line (tools/convert); {checkpoint} and {out} are filled in. Without
# --tokenizer the converter ships the tokenizer the trainer keeps beside the checkpoints.
CONVERT_COMMAND = ("-m", "tools.convert", "mcore2hf", "--mcore", "{checkpoint}", "--out", "{out}", "--quiet")
TOKENIZER_OPTION = ("--tokenizer", "{tokenizer}")


@dataclass
class Snapshot:
    iteration: int
    hf_dir: Path | None = None
    megatron_dir: Path | None = None


def iteration_of(path: Path) -> int | None:
    match = ITERATION.search(path.name)
    return int(match.group(1)) if match else None


def is_hf_export(path: Path) -> bool:
    return (path / "config.json").is_file() and any(any(path.glob(p)) for p in WEIGHTS)


def is_megatron_checkpoint(path: Path) -> bool:
    return ckpt_format.is_iteration_dir(path) and path.name != ckpt_format.RELEASE


def find_snapshots(run_dir: Path) -> list[Snapshot]:
    """Every iteration of the run with an HF export and/or a Megatron checkpoint, in order."""
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    found: dict[int, Snapshot] = {}
    for root, dirs, _ in os.walk(run_dir):
        for name in sorted(dirs):
            path = Path(root) / name
            iteration = iteration_of(path)
            if iteration is None:
                continue
            snapshot = found.setdefault(iteration, Snapshot(iteration))
            if is_hf_export(path):
                snapshot.hf_dir = snapshot.hf_dir or path
            elif is_megatron_checkpoint(path):
                snapshot.megatron_dir = snapshot.megatron_dir or path
        dirs[:] = [d for d in dirs if iteration_of(Path(d)) is None]  # do not descend into snapshots
    snapshots = [s for _, s in sorted(found.items()) if s.hf_dir or s.megatron_dir]
    if not snapshots:
        raise ConfigError(f"run directory {run_dir} has no HF exports or Megatron checkpoints")
    return snapshots


def megatron_to_hf(checkpoint_dir: Path, out_dir: Path, tokenizer: Path | None = None) -> Path:
    """Convert one Megatron checkpoint into an HF directory at ``out_dir`` (atomically).

    The one place ``tools/eval`` depends on ``tools/convert``: it runs the
    converter's ``mcore2hf`` command (:data:`CONVERT_COMMAND`) in a subprocess
    into a temporary directory and renames it when complete; a failure (no
    converter installed included) ends with the converter's last error line.
    ``tokenizer`` (an HF tokenizer directory) is shipped with the export.
    """
    template = CONVERT_COMMAND + (TOKENIZER_OPTION if tokenizer else ())
    hint = "it is no complete HF export: delete it to convert again"
    # create=False: the converter refuses an existing output
    with paths.atomic_dir(out_dir, exists_hint=hint, writers="exports", create=False) as temp:
        args = [a.format(checkpoint=checkpoint_dir, out=temp, tokenizer=tokenizer) for a in template]
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"converting {checkpoint_dir} failed: {last}")
    return out_dir


def resolve_hf_dirs(
    snapshots: list[Snapshot], export_root: Path, convert: bool, tokenizer: Path | None = None
) -> tuple[list[tuple[int, Path]], list[str]]:
    """([(iteration, hf dir)], [skip notes]): exports as found, Megatron-only ones converted if asked."""
    ready, skipped = [], []
    for snap in snapshots:
        if snap.hf_dir:
            ready.append((snap.iteration, snap.hf_dir))
        elif convert:
            target = export_root / ckpt_format.iteration_dir_name(snap.iteration)
            if not is_hf_export(target):
                megatron_to_hf(snap.megatron_dir, target, tokenizer)
            ready.append((snap.iteration, target))
        else:
            skipped.append(
                f"iteration {snap.iteration}: Megatron checkpoint only (pass --convert to convert it)"
            )
    return ready, skipped


def write_csv(rows: list[tuple[int, ChannelResult]], path: Path) -> None:
    with paths.atomic_file(path) as temp, temp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "channel", "tokens", "loss", "ppl"])
        for iteration, r in rows:
            writer.writerow([iteration, r.channel, r.tokens, f"{r.loss:.6f}", f"{r.ppl:.6f}"])


def plot_trends(rows: list[tuple[int, ChannelResult]], path: Path) -> None:
    """Loss per channel against iteration, one line each."""
    fig, ax = plots.pyplot().subplots(figsize=(7, 4))
    for channel in dict.fromkeys(r.channel for _, r in rows):
        points = [(it, r.loss) for it, r in rows if r.channel == channel]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=channel)
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    plots.save(fig, path)
