"""Where numbers go: TensorBoard, an iteration log (``metrics.jsonl``), the console, W&B if present.

Only the logging rank (the last global rank, which holds the last pipeline
stage and so the loss) writes; on every other rank the writer does nothing.
Also here: model FLOPs per iteration (Megatron-LM's formula) for the MFU
estimate, and the peak bf16 throughput of known GPUs.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from megatron_patches.training.model import ModelConfig

# Dense bf16 tensor-core peak per GPU, FLOP/s (vendor datasheets).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
}


def flops_per_iteration(cfg: ModelConfig, seq_length: int, global_batch_size: int) -> float:
    """Forward + backward model FLOPs of one iteration (Megatron-LM's accounting, no recompute).

    Per token and layer: QKV and output projections with GQA, attention scores
    and values (causal mask not discounted, as Megatron-LM), and the MLP (3
    matrices with SwiGLU); plus the output layer. Backward costs twice forward.
    """
    h, layers, s = cfg.hidden_size, cfg.num_layers, seq_length
    kv = cfg.groups * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    attn_proj = 2 * h * (q + 2 * kv) + 2 * q * h
    attn_scores = 2 * 2 * s * q
    mlp = 2 * h * cfg.ffn_hidden_size * (3 if cfg.swiglu else 2)
    logits = 2 * h * cfg.padded_vocab_size(1)
    per_token_forward = layers * (attn_proj + attn_scores + mlp) + logits
    return 3.0 * per_token_forward * s * global_batch_size


def peak_flops_per_gpu() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


class MetricsWriter:
    def __init__(
        self,
        run_dir: Path,
        tensorboard_dir: str | None,
        enabled: bool,
        wandb_project: str | None,
        config: dict,
    ) -> None:
        self.enabled = enabled
        self.tb = self.jsonl = self.wandb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=tensorboard_dir or str(run_dir / "tensorboard"))
        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        if wandb_project and not importlib.util.find_spec("wandb"):
            note = f"note: wandb is not installed, so logging.wandb_project={wandb_project!r} is skipped"
            self.console(note)
        elif wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config)

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


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
