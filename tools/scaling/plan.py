"""``plan``: a grid of model sizes x token budgets (or an IsoFLOP grid) from a base trainer config.

Sizes follow two rules of thumb kept from the base model: the head dimension
and the width/depth ratio (``hidden_size / num_layers``), plus its query/KV
group ratio and FFN/hidden ratio. Every shape keeps what Megatron-Core needs:
heads divide the hidden size, query groups divide the heads, TP divides heads
and groups, PP divides the layers. ``N`` is the non-embedding parameter count
(Kaplan et al.; tiny models are otherwise mostly embedding) and ``D`` the
tokens trained; each point carries ``6ND`` and the trainer's exact FLOPs
(:mod:`megatron_patches.flops`, attention and output layer included).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from megatron_patches.config_io import set_dotted
from megatron_patches.errors import ConfigError
from megatron_patches.flops import model_flops_per_token
from megatron_patches.formats.model_config import ModelConfig

FFN_MULTIPLE = 16  # FFN widths are rounded up to this (tensor-core friendly, divisible by small TPs)


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int


@dataclass
class Point:
    """One grid run: its shape, budget, hyper-parameters and the trainer overrides that make it."""

    name: str
    shape: Shape
    params: int  # non-embedding parameters N
    tokens: int  # D = train_iters * global_batch_size * seq_length
    train_iters: int
    lr: float
    global_batch_size: int
    flops_per_token: float  # the trainer's per-token FLOPs (forward + backward)
    overrides: list[str] = field(default_factory=list)

    @property
    def flops_6nd(self) -> float:
        return 6.0 * self.params * self.tokens

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flops_6nd": self.flops_6nd, "flops": self.flops}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Point:
        values = {k: v for k, v in values.items() if k not in ("flops_6nd", "flops")}
        return cls(**{**values, "shape": Shape(**values["shape"])})


def apply_sets(raw: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``raw`` with dotted ``section.key=value`` settings applied (values parsed as YAML)."""
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"setting {item!r} is not of the form section.key=value")
        set_dotted(raw, key, yaml.safe_load(text) if text else "")
    return raw


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"base config: {name} must be a mapping")
    return value


def shape_for_width(model: dict[str, Any], hidden: int, tp: int = 1, pp: int = 1) -> Shape:
    """The base model's proportions at width ``hidden``; a one-line error if a rule cannot hold."""
    heads0 = int(model.get("num_attention_heads", 4))
    hidden0, layers0 = int(model.get("hidden_size", 64)), int(model.get("num_layers", 2))
    head_dim = int(model.get("kv_channels") or hidden0 // heads0)
    per_group = heads0 // int(model.get("num_query_groups") or heads0)
    if hidden % head_dim:
        raise ConfigError(f"hidden size {hidden} is not a multiple of the base head dimension {head_dim}")
    heads = hidden // head_dim
    # Query groups: the divisor of the heads nearest the base's heads-per-group ratio that TP divides.
    fits = [g for g in range(tp, heads + 1, tp) if heads % g == 0]
    if heads % tp or not fits:
        raise ConfigError(f"hidden size {hidden}: its {heads} attention heads are not divisible by TP {tp}")
    groups = min(fits, key=lambda g: abs(math.log(g * per_group / heads)))
    ffn0 = int(model.get("ffn_hidden_size", 4 * hidden0))
    ffn = -(-round(ffn0 / hidden0 * hidden) // FFN_MULTIPLE) * FFN_MULTIPLE
    layers = max(pp, round(hidden * layers0 / hidden0 / pp) * pp)  # the base's width/depth ratio
    return Shape(layers, hidden, ffn, heads, groups, head_dim)


def non_embedding_params(shape: Shape, swiglu: bool = True) -> int:
    """Weights of the transformer layers and final norm (no embedding, no output layer, no biases)."""
    h, q = shape.hidden_size, shape.num_attention_heads * shape.head_dim
    kv = shape.num_query_groups * shape.head_dim
    per_layer = h * q + 2 * h * kv + q * h + (3 if swiglu else 2) * h * shape.ffn_hidden_size + 2 * h
    return shape.num_layers * per_layer + h


@dataclass
class GridSpec:
    """What to vary: widths, and token budgets or compute budgets (IsoFLOP), learning rates, batches."""

    widths: list[int]
    tokens: list[float] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)  # IsoFLOP: per budget, D = C / FLOPs per token
    lrs: list[float] = field(default_factory=list)  # default: the base config's
    batches: list[int] = field(default_factory=list)  # global batch sizes (sequences); default: base
    min_iters: int = 10  # IsoFLOP points with fewer iterations are left out

    def check(self) -> None:
        if not self.widths:
            raise ConfigError("the grid needs at least one width (--widths)")
        if bool(self.tokens) == bool(self.flops):
            raise ConfigError("give either token budgets (--tokens) or compute budgets (--flops), not both")
        numbers = [*self.widths, *self.tokens, *self.flops, *self.lrs, *self.batches]
        if any(not value > 0 for value in numbers):
            raise ConfigError(f"grid values must be positive, got {sorted(numbers)}")


def plan_grid(raw: dict[str, Any], spec: GridSpec) -> list[Point]:
    """Every grid point of ``spec`` on the base config ``raw`` (its YAML mapping, settings applied)."""
    spec.check()
    model, data, train = _section(raw, "model"), _section(raw, "data"), _section(raw, "train")
    parallel, optimizer = _section(raw, "parallel"), _section(raw, "optimizer")
    tp = int(parallel.get("tensor_model_parallel_size", 1))
    pp = int(parallel.get("pipeline_model_parallel_size", 1))
    seq = int(data.get("seq_length", 1024))
    micro = int(train.get("micro_batch_size", 1))
    lrs = spec.lrs or [float(optimizer.get("lr", 1e-4))]
    batches = spec.batches or [int(train.get("global_batch_size", micro))]
    if any(batch % micro for batch in batches):
        raise ConfigError(f"global batch sizes {batches} must be multiples of micro_batch_size {micro}")
    points = []
    for width in sorted(set(spec.widths)):
        shape = shape_for_width(model, width, tp, pp)
        per_token = _flops_per_token(model, shape, seq)
        budgets = spec.tokens or [flops / per_token for flops in spec.flops]
        for budget in budgets:
            for lr in lrs:
                for batch in batches:
                    iters = max(1, round(budget / (seq * batch)))
                    if spec.flops and iters < spec.min_iters:
                        continue
                    points.append(_point(raw, shape, per_token, iters, lr, batch, seq))
    if not points:
        raise ConfigError(f"no grid point has {spec.min_iters} iterations or more: raise the compute budgets")
    names = [p.name for p in points]
    twins = sorted({name for name in names if names.count(name) > 1})
    if twins:
        raise ConfigError(
            f"budgets that round to the same iterations give the same runs {twins}: spread them"
        )
    return points


def _flops_per_token(model: dict[str, Any], shape: Shape, seq: int) -> float:
    """The trainer's FLOPs per token for the base model at ``shape`` (one formula: megatron_patches.flops)."""
    sizes = asdict(shape)
    sizes["kv_channels"] = sizes.pop("head_dim")
    return model_flops_per_token(ModelConfig.from_dict({**model, **sizes}), seq)


def _point(raw: dict[str, Any], shape: Shape, per_token: float, iters: int, lr: float, batch: int, seq: int):
    tokens = iters * batch * seq
    name = f"h{shape.hidden_size}-l{shape.num_layers}-d{tokens:.3g}-lr{lr:g}-b{batch}".replace("+", "")
    return Point(
        name=name,
        shape=shape,
        params=non_embedding_params(shape, bool(raw.get("model", {}).get("swiglu", True))),
        tokens=tokens,
        train_iters=iters,
        lr=lr,
        global_batch_size=batch,
        flops_per_token=per_token,
        overrides=run_overrides(raw, shape, iters, lr, batch),
    )


def run_overrides(raw: dict[str, Any], shape: Shape, iters: int, lr: float, batch: int) -> list[str]:
    """Trainer ``key=value`` overrides for one point; schedule lengths scale with ``train_iters``."""
    optimizer, train = _section(raw, "optimizer"), _section(raw, "train")
    logging = _section(raw, "logging")
    base_iters = int(train.get("train_iters", iters))
    base_lr = float(optimizer.get("lr", lr))
    warmup = round(int(optimizer.get("lr_warmup_iters", 0)) * iters / base_iters)
    values = {
        "model.num_layers": shape.num_layers,
        "model.hidden_size": shape.hidden_size,
        "model.ffn_hidden_size": shape.ffn_hidden_size,
        "model.num_attention_heads": shape.num_attention_heads,
        "model.num_query_groups": shape.num_query_groups,
        "train.train_iters": iters,
        "train.global_batch_size": batch,
        "optimizer.lr": lr,
        "optimizer.min_lr": float(optimizer.get("min_lr", 0.0)) * lr / base_lr,
        "optimizer.lr_warmup_iters": min(warmup, iters - 1),
        "logging.eval_interval": min(int(logging.get("eval_interval") or iters), iters),
        "logging.log_interval": min(int(logging.get("log_interval", 1)), iters),
    }
    if optimizer.get("lr_decay_iters"):
        values["optimizer.lr_decay_iters"] = iters
    if _section(raw, "model").get("kv_channels"):
        values["model.kv_channels"] = shape.head_dim
    return [f"{key}={value}" for key, value in values.items()]
