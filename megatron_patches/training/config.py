"""Typed training config: YAML file + ``key=value`` overrides, validated as a whole.

Field names are Megatron-LM's argument names (``micro_batch_size``,
``lr_decay_style``, ``save_interval`` ...) grouped in sections. An override may
name a field by its dotted path (``train.micro_batch_size=4``) or, as a
Megatron user would, by its bare name when exactly one section has it
(``micro_batch_size=4``). Values are parsed as YAML (``lr=3e-4``,
``data_path=[1,a,1,b]``). Every unknown key is an error, before anything runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_patches.config_io import config_fields, field_type, from_dict, read_yaml, set_dotted, suggest
from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Megatron-LM's --sequence-parallel: norms/dropout shard the sequence over TP (activation memory / TP).
    # None: on when TP > 1 on a GPU, off on CPU; plan_run resolves it to a bool before anything is built.
    sequence_parallel: bool | None = None
    # Needs Transformer Engine's attention: refused on the local spec.
    context_parallel_size: int = 1
    # Interleaved 1F1B: each pipeline rank holds this many model chunks (Megatron-LM's names; give one
    # of the two). Needs PP >= 2, num_layers divisible by PP x VPP and micro-batches a multiple of PP.
    virtual_pipeline_model_parallel_size: int | None = None
    num_layers_per_virtual_pipeline_stage: int | None = None
    # Mixture-of-Experts: experts split over EP ranks; each expert's FFN split over ETP ranks
    # (None: TP, as Megatron-Core). EP x ETP x PP must divide the world size.
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None


@dataclass
class DDPConfig:
    """Megatron-Core's ``DistributedDataParallelConfig`` fields (Megatron-LM's argument names)."""

    overlap_grad_reduce: bool = False  # reduce-scatter gradient buckets during backward
    overlap_param_gather: bool = False  # all-gather updated weights during the next forward
    bucket_size: int | None = None  # parameters per bucket; None: Megatron-Core's default
    average_in_collective: bool = False  # average gradients inside the collective (not before it)


@dataclass
class DataConfig:
    data_path: list = field(default_factory=list)  # [w1, prefix1, w2, prefix2, ...]
    blend: str | None = None  # a blend.yaml from data/preprocess (data_path, channels, tokenizer)
    channels: dict = field(default_factory=dict)  # channel name -> prefix
    mock: bool = False
    split: str = "99,1,0"
    seq_length: int = 128
    data_cache_path: str | None = None  # default: <run_dir>/data_cache
    tokenizer: str | None = None  # HF tokenizer dir; gives eod/vocab when no blend.yaml does
    eod_id: int | None = None
    reset_position_ids: bool = False
    # document masking: a token attends only to its own document of a packed sample (an experiment
    # option: Megatron builds a [s, s] mask per sample; local spec only, not Transformer Engine)
    reset_attention_mask: bool = False
    # false: documents enter samples in .bin order (tokenize.order: icp); samples are still shuffled
    shuffle_documents: bool = True
    eod_mask_loss: bool = False
    num_workers: int = 0  # threads that read an iteration's samples (0: read them in the training thread)
    anneal_fraction: float = 0.0  # the final fraction of iterations reads anneal_data_path
    anneal_data_path: list = field(default_factory=list)
    # [[start, end], ...]: sample ids (both included, as the loss-spike log prints them) never read;
    # [start, end, phase] for a phase other than main. Checkpoints keep them (training.skip_windows).
    skip_samples: list = field(default_factory=list)
    # The plan refuses a channel the run would read more than this many times (training/data_plan.py);
    # null: no limit (Megatron-LM has none). Repeats beyond ~4 epochs add little (Muennighoff et al. 2023).
    max_epochs: float | None = 4.0


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 100
    exit_interval: int | None = None  # save and exit 0 at iterations divisible by this (job time limits)
    bf16: bool = False  # bf16 params with fp32 main grads (GPU); CPU runs fp32
    # Megatron-LM's --manual-gc: no automatic Python GC during training (its pauses land on one
    # rank at a time and stall the others at the next collective); collect on every rank at once,
    # every manual_gc_interval iterations (0: only before evaluations and checkpoints).
    manual_gc: bool = False
    manual_gc_interval: int = 0
    # The memory plan (training/memory_plan.py) refuses a run above this per GPU; None: the visible
    # GPU's memory, no limit on CPU.
    gpu_memory_gb: float | None = None


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    lr_decay_style: str = "cosine"  # constant | linear | cosine | WSD | multi-step
    lr_decay_iters: int | None = None  # default: train_iters
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_style: str = "linear"
    lr_multi_step_boundaries: list = field(default_factory=lambda: [0.8, 0.9])
    lr_multi_step_factors: list = field(default_factory=lambda: [0.316, 0.1])


@dataclass
class CheckpointConfig:
    save: str | None = None  # default: <run_dir>/checkpoints
    load: str | None = None  # resume from here (default: save, when it has a checkpoint)
    load_iteration: int | None = None  # resume from this older checkpoint (default: the tracker's)
    pretrained_checkpoint: str | None = None  # a converter `release` dir: weights only
    use_checkpoint_args: bool = False  # take the model section from the checkpoint loaded (as Megatron-LM)
    # The architecture of a pretrained checkpoint that records neither model_config nor Megatron-LM args:
    # a YAML of model fields or a Megatron-LM argument list file.
    pretrained_model_config: str | None = None
    save_interval: int | None = None
    save_interval_minutes: float | None = None
    keep_last: int = 3
    save_at_end: bool = True  # checkpoint after the last iteration (off for benchmarks)
    async_save: bool = False  # Megatron-LM's key; refused when true: saves are synchronous
    # Optimizer state in model space (Megatron-LM's --dist-ckpt-optim-fully-reshardable): a resume may
    # change TP/PP/VPP/DP, but each save all-gathers the DP group's optimizer state into every rank's
    # host memory (12 bytes x parameters / (TP x PP) per rank: 42 GB for 7B at TP2), so it is off by
    # default as in Megatron-LM. false: per-rank shards, no gather; a resume may change DP only.
    dist_ckpt_optim_fully_reshardable: bool = False
    # Settings a resume may change although the checkpoint recorded others (run_settings.py), e.g.
    # [data.blend] for a deliberate data-mix change mid-run; each change is logged.
    allow_change: list = field(default_factory=list)


@dataclass
class LoggingConfig:
    log_interval: int = 10
    eval_interval: int | None = None
    eval_iters: int = 4
    tensorboard_dir: str | None = None  # default: <run_dir>/tensorboard
    wandb_project: str | None = None
    wandb_exp_name: str | None = None  # the W&B run's display name (Megatron-LM's --wandb-exp-name)
    wandb_entity: str | None = None


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    patches: dict = field(default_factory=dict)  # patch name -> its options (see hooks.py)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (YAML), apply ``key=value`` overrides, build the typed config."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return from_dict(Config, raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b=value`` (or a bare unique field name) in the raw config dict."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    dotted = key if "." in key else _section_of(key)
    set_dotted(raw, dotted, yaml.safe_load(text) if text else "")


def _sections() -> list[str]:
    return [name for name in config_fields(Config) if dataclasses.is_dataclass(field_type(Config, name))]


def _section_of(name: str) -> str:
    if name in config_fields(Config):
        return name
    owners = [s for s in _sections() if name in config_fields(field_type(Config, s))]
    if len(owners) == 1:
        return f"{owners[0]}.{name}"
    if len(owners) > 1:
        raise ConfigError(f"override key {name!r} is ambiguous: use one of {[f'{o}.{name}' for o in owners]}")
    # patches.<name>.<option> has no fixed schema here; anything else is a typo.
    leaves = [leaf for s in _sections() for leaf in config_fields(field_type(Config, s))]
    raise ConfigError(f"unknown config key {name!r}{suggest(name, leaves + config_fields(Config))}")
