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
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_patches.errors import ConfigError
from megatron_patches.training.model import ModelConfig


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1


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
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    anneal_fraction: float = 0.0  # the final fraction of iterations reads anneal_data_path
    anneal_data_path: list = field(default_factory=list)


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 100
    exit_interval: int | None = None  # save and exit 0 at iterations divisible by this (job time limits)
    bf16: bool = False  # bf16 params with fp32 main grads (GPU); CPU runs fp32


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
    pretrained_checkpoint: str | None = None  # a converter `release` dir: weights only
    use_checkpoint_args: bool = False  # take the model section from the checkpoint loaded (as Megatron-LM)
    save_interval: int | None = None
    save_interval_minutes: float | None = None
    keep_last: int = 3
    save_at_end: bool = True  # checkpoint after the last iteration (off for benchmarks)
    async_save: bool = False


@dataclass
class LoggingConfig:
    log_interval: int = 10
    eval_interval: int | None = None
    eval_iters: int = 4
    tensorboard_dir: str | None = None  # default: <run_dir>/tensorboard
    wandb_project: str | None = None


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
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
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}".splitlines()[0]) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(Config, raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b=value`` (or a bare unique field name) in the raw config dict."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    dotted = key if "." in key else _section_of(key)
    value = yaml.safe_load(text) if text else ""
    node = raw
    *parents, leaf = dotted.split(".")
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {name} is not a section")
    node[leaf] = value


def _section_of(name: str) -> str:
    if name in _fields(Config):
        return name
    sections = [
        s.name for s in dataclasses.fields(Config) if dataclasses.is_dataclass(_field_type(Config, s.name))
    ]
    owners = [s for s in sections if name in _fields(_field_type(Config, s))]
    if len(owners) == 1:
        return f"{owners[0]}.{name}"
    if len(owners) > 1:
        raise ConfigError(f"override key {name!r} is ambiguous: use one of {[f'{o}.{name}' for o in owners]}")
    # patches.<name>.<option> has no fixed schema here; anything else is a typo.
    raise ConfigError(f"unknown config key {name!r}{_suggest(name, _all_leaf_names())}")


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``values``, checking names and types recursively."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {where or cls.__name__} must be a mapping, got {values!r}")
    names = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        path = f"{where}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}{_suggest(key, names)}")
        kind = _field_type(cls, key)
        if dataclasses.is_dataclass(kind):
            kwargs[key] = from_dict(kind, value or {}, f"{path}.")
        else:
            kwargs[key] = _coerce(value, kind, path)
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, path: str) -> Any:
    allowed = _allowed_types(kind)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str):
        # YAML 1.1 reads 3e-4 (no dot) as a string; every Megatron user writes it so.
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tuple(t for t in allowed if t is not type(None))):
        if isinstance(value, bool) and bool not in allowed:
            raise ConfigError(f"config key {path!r} expects {_type_name(kind)}, got {value!r}")
        return value
    raise ConfigError(f"config key {path!r} expects {_type_name(kind)}, got {value!r}")


def _allowed_types(kind: Any) -> tuple[type, ...]:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return tuple(t for arg in typing.get_args(kind) for t in _allowed_types(arg))
    origin = typing.get_origin(kind)
    return (origin or kind,)


def _type_name(kind: Any) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in _allowed_types(kind))


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _all_leaf_names() -> list[str]:
    names = []
    for section in dataclasses.fields(Config):
        kind = _field_type(Config, section.name)
        names += _fields(kind) if dataclasses.is_dataclass(kind) else [section.name]
    return names


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
