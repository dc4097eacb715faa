"""The settings a resume must keep: recorded in every checkpoint, compared before a resume loads.

A checkpoint's tensors (weights, Adam moments, scheduler) mean something only with
the data order and token ids they were trained on: the seed (dataset shuffle),
the blend and its weights, the split, the sequence length, the global batch, the
tokenizer and its end-of-document id. A resume that changes one of them runs on
silently as another run (another shuffle: every later loss differs). The trainer
stores :func:`run_settings` in each checkpoint's common state, and
:func:`check_resume` refuses a change in one line naming the old and the new
value, unless ``checkpoint.allow_change`` names the setting (a deliberate
data-mix change mid-run, say), in which case the change is logged.

``data.seq_length`` is the configured length: a sequence-length schedule
(``rope_schedule``) derives each phase's length from the config, so a resume in
a later phase compares the same configured value.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from megatron_patches.config_io import suggest
from megatron_patches.errors import ConfigError
from megatron_patches.training.data import parse_blend

if TYPE_CHECKING:
    from megatron_patches.training.config import Config

SETTINGS = (
    "seed",
    "data.seq_length",
    "data.blend",
    "data.split",
    "data.anneal_data_path",
    "data.anneal_fraction",
    "data.tokenizer",
    "data.eod_id",
    "data.shuffle_documents",
    "train.global_batch_size",
    "parallel.expert_model_parallel_size",
    "parallel.expert_tensor_parallel_size",
)
# Settings no override can change on a resume, and why.
FIXED = {
    # The data position is computed from the iteration and the global batch (consumed_samples must agree).
    "train.global_batch_size": "the data position is computed from it",
    # MoE: Megatron-Core's distributed optimizer keeps the experts' state per expert-data-parallel
    # shard; another EP/ETP fails deep in dist_checkpointing's load (a KeyError per rank).
    "parallel.expert_model_parallel_size": "the experts' optimizer state is sharded by it",
    "parallel.expert_tensor_parallel_size": "the experts' optimizer state is sharded by it",
}


def run_settings(
    cfg: Config, data_path: list, anneal_data_path: list, tokenizer: str | None, eod_id: int
) -> dict:
    """The values of :data:`SETTINGS` for this run (data as resolved from ``data_path`` or ``blend``)."""
    return {
        "seed": cfg.seed,
        "data.seq_length": cfg.data.seq_length,
        "data.blend": "mock" if cfg.data.mock else _blend(data_path),
        "data.split": cfg.data.split,
        "data.anneal_data_path": _blend(anneal_data_path),
        "data.anneal_fraction": cfg.data.anneal_fraction,
        "data.tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
        "data.eod_id": eod_id,
        "data.shuffle_documents": cfg.data.shuffle_documents,
        "train.global_batch_size": cfg.train.global_batch_size,
        **_expert_layout(cfg),
    }


def _expert_layout(cfg: Config) -> dict:
    """EP and ETP (None: TP) of a MoE run; None for a dense one, whose TP may change on a resume."""
    par, moe = cfg.parallel, cfg.model.num_moe_experts is not None
    return {
        "parallel.expert_model_parallel_size": par.expert_model_parallel_size if moe else None,
        "parallel.expert_tensor_parallel_size": (
            (par.expert_tensor_parallel_size or par.tensor_model_parallel_size) if moe else None
        ),
    }


def _blend(data_path: list) -> list:
    """``[w1, prefix1, ...]`` with weights normalized to sum 1 and prefixes as absolute paths.

    ``[1, a, 1, b]`` and ``[2, a, 2, b]`` are the same blend (Megatron normalizes the
    weights), and a relative prefix means the same files from another working directory.
    """
    if not data_path:
        return []
    prefixes, weights = parse_blend(data_path)
    total = sum(weights)
    return [x for w, p in zip(weights, prefixes, strict=True) for x in (w / total, str(Path(p).resolve()))]


def check_allow_change(names: list) -> None:
    """Stop with one line when ``checkpoint.allow_change`` names a setting that may not change."""
    for name in names:
        if name not in SETTINGS:
            raise ConfigError(
                f"checkpoint.allow_change: {name!r} is not a recorded run setting"
                f"{suggest(str(name), list(SETTINGS))} (known: {', '.join(SETTINGS)})"
            )
        if name in FIXED:
            raise ConfigError(
                f"checkpoint.allow_change: {name} cannot change on a resume ({FIXED[name]}); "
                "start a new run from the weights with checkpoint.pretrained_checkpoint"
            )


def check_resume(path: Path, saved: dict | None, current: dict, allow_change: list) -> list[str]:
    """Log lines for the resume from ``path``; a ConfigError for a change ``allow_change`` does not name."""
    if saved is None:
        return [
            f"resume: checkpoint {path} predates recorded run settings, so a change of "
            f"{', '.join(SETTINGS)} since it was written cannot be detected"
        ]
    changed = [name for name in SETTINGS if name in saved and saved[name] != current[name]]
    refused = [name for name in changed if name not in allow_change]
    if refused:
        diffs = "; ".join(
            f"{name}: checkpoint {saved[name]!r}, this run {current[name]!r}" for name in refused
        )
        fixed = [name for name in refused if name in FIXED]
        hint = (
            "start a new run from its weights with checkpoint.pretrained_checkpoint"
            if fixed
            else f"pass checkpoint.allow_change=[{','.join(refused)}] to change it deliberately"
        )
        raise ConfigError(f"resuming {path} would change {diffs}; restore the setting, or {hint}")
    return [
        f"resume: {name} changes from {saved[name]!r} to {current[name]!r} (checkpoint.allow_change)"
        for name in changed
    ]
