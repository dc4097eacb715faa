"""Where numbers go: TensorBoard, an iteration log (``metrics.jsonl``), the console, W&B if present.

Only the logging rank (the last global rank, which holds the last pipeline
stage and so the loss) writes; on every other rank the writer does nothing.
A resumed run repeats the iterations the previous run logged past its
checkpoint, so the writer first cuts ``metrics.jsonl`` back to the resumed
iteration (a rewrite, renamed over the old file) and opens a TensorBoard event
file with ``purge_step`` (TensorBoard then hides the older files' later steps);
an in-process roll-back tags the records it abandons (``rolled_back_at``) and
purges TensorBoard the same way;
W&B resumes the run whose id is kept in ``<run_dir>/wandb_run_id``.
Also here: the peak bf16 throughput of known GPUs for the MFU estimate (the
model FLOPs per iteration come from :mod:`megatron_patches.flops`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import secrets
import time
from pathlib import Path
from typing import Any

from megatron_patches import paths
from megatron_patches.flops import flops_per_iteration  # noqa: F401 - the loop and bench take it from here

# Dense bf16 tensor-core peak per GPU, FLOP/s (vendor datasheets).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
}


def peak_flops_per_gpu() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


class MetricsWriter:
    def __init__(
        self, run_dir: Path, logging_cfg, enabled: bool, config: dict, resumed_iteration: int = 0
    ) -> None:
        """``logging_cfg`` is the config's ``logging`` section; ``resumed_iteration`` 0 for a fresh start."""
        self.enabled = enabled
        self.tb = self.jsonl = self.wandb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        dropped = keep_records_until(run_dir / METRICS_FILE, resumed_iteration)
        if dropped:
            note = f"dropped {dropped} records past iteration {resumed_iteration} (this run repeats them)"
            self.console(f"{METRICS_FILE}: {note}")
        tb_dir = logging_cfg.tensorboard_dir or str(run_dir / "tensorboard")
        self.tb = SummaryWriter(log_dir=tb_dir, purge_step=resumed_iteration + 1)
        self.jsonl_path = run_dir / METRICS_FILE
        self.jsonl = self.jsonl_path.open("a")
        project = logging_cfg.wandb_project
        if project and not importlib.util.find_spec("wandb"):
            self.console(f"note: wandb is not installed, so logging.wandb_project={project!r} is skipped")
        elif project:
            self.wandb = init_wandb(run_dir, logging_cfg, config)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.tb.add_scalar(name, value, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def record(self, record: dict) -> None:
        if self.enabled:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def rolled_back(self, to_iteration: int, at_iteration: int) -> None:
        """An in-process roll-back to ``to_iteration``: tag the records it abandons (:func:`tag_abandoned`)
        and open a new TensorBoard event file with ``purge_step``, as a resume does (the abandoned
        steps, the anomaly's ``spike/score`` included, are then hidden; ``loss_spikes.jsonl`` keeps it).
        """
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl.close()
        tag_abandoned(self.jsonl_path, to_iteration, at_iteration)
        self.jsonl = self.jsonl_path.open("a")
        log_dir = self.tb.get_logdir()
        self.tb.close()
        self.tb = SummaryWriter(log_dir=log_dir, purge_step=to_iteration + 1)

    def console(self, line: str) -> None:
        if self.enabled:
            print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self.tb.flush()
            self.tb.close()
            self.jsonl.close()
            if self.wandb:
                self.wandb.finish()


def keep_records_until(path: Path, iteration: int) -> int:
    """Cut the iteration log at ``path`` back to records up to ``iteration``; return how many went.

    The records past it (and a line torn by a kill) belong to iterations the resumed run repeats.
    The kept lines are written to a temporary file renamed over the log, so a kill during the cut
    leaves the old log or the new one, never a half-written one.
    """
    if not path.is_file():
        return 0
    text = path.read_text()
    lines = text.splitlines()
    kept = [line for line in lines if _iteration_of(line) <= iteration]
    if not text or (len(kept) == len(lines) and text.endswith("\n")):
        return 0
    paths.write_text_atomic(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def tag_abandoned(path: Path, iteration: int, rolled_back_at: int) -> int:
    """Add ``"rolled_back_at": rolled_back_at`` to the records past ``iteration``; return how many.

    A roll-back at ``rolled_back_at`` abandoned them and the run logs those iterations again, so a
    reader skips the tagged records (the last record of each iteration is right either way). An
    earlier roll-back's tag stays. Rewritten and renamed over the log, as :func:`keep_records_until`.
    """
    lines = path.read_text().splitlines() if path.is_file() else []
    tagged = 0
    for index, line in enumerate(lines):
        record = json.loads(line) if iteration < _iteration_of(line) < math.inf else {}
        if record and "rolled_back_at" not in record:
            lines[index] = json.dumps({**record, "rolled_back_at": rolled_back_at})
            tagged += 1
    if tagged:
        paths.write_text_atomic(path, "".join(line + "\n" for line in lines))
    return tagged


def _iteration_of(line: str) -> float:
    """The record's iteration; infinity for a line that is no record (torn by a kill)."""
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def init_wandb(run_dir: Path, logging_cfg, config: dict) -> Any:
    """Start the W&B run, or resume the one this run directory started before (a requeued job).

    The id is chosen and kept in ``<run_dir>/wandb_run_id`` before ``wandb.init``, so a job killed
    during its first init still resumes the same W&B run. Names are Megatron-LM's
    (``--wandb-project``, ``--wandb-exp-name``, ``--wandb-entity``).
    """
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(4)  # W&B ids: lower-case letters and digits
        paths.write_text_atomic(id_file, run_id + "\n")
    return wandb.init(
        project=logging_cfg.wandb_project,
        entity=logging_cfg.wandb_entity,
        name=logging_cfg.wandb_exp_name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config,
    )


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
