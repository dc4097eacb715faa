"""Staged RoPE base / sequence length: e.g. 90% of tokens at 4K with base 10k, then 32K with base 1M.

What it changes: Megatron-Core fixes ``rotary_base`` when ``GPTModel`` builds its
``RotaryEmbedding`` (``inv_freq`` is computed once in ``__init__``, and
``RotaryEmbedding.forward`` is memoised with ``functools.lru_cache`` on
``(self, max_seq_len, ...)``), and Megatron-LM fixes ``--seq-length`` for the
whole run. Long context is usually built inside pretraining instead: a final
share of the tokens at a longer length with a larger base ("ABF"). This patch
turns an ordered list of stages into the run's data phases and switches the
model between them:

* Config: ``stages: [{until_tokens | until_fraction, seq_length, rotary_base,
  micro_batch_size?}, ...]``; the last stage runs to the end of training
  (``until_fraction: 1`` or nothing). A stage switches at the first iteration
  whose consumed tokens reach its predecessor's ``until``.
* Tokens per iteration (``train.global_batch_size x data.seq_length``) stay
  constant by default: a stage's global batch, in sequences, is that divided by
  its ``seq_length`` (which must divide it), so learning-rate schedules in
  iterations stay schedules in tokens. ``keep_tokens_per_iteration: false``
  keeps the global batch in sequences instead.
* The patch keeps its own record of the bases (its stage spans, by iteration):
  the loop's phases know only lengths and batches; ``Hook.model_config`` tells
  the loop the model each phase trains (what checkpoints record).
* At a boundary: the loop saves a checkpoint after the last iteration of the old
  stage; the next phase rebuilds ``GPTDataset``s for the new length and
  continues the blend by tokens (``data.phase_sample_offset``); every
  ``RotaryEmbedding`` of this rank's model stage gets ``inv_freq`` for the new
  base (computed by Megatron-Core's own constructor, so ``rope_scaling`` and
  ``rotary_percent`` apply as in a fresh model), and the ``forward`` cache and
  ``GPTModel.rotary_pos_emb_cache`` are cleared. ``inv_freq`` is not in the
  checkpoint (Megatron-Core drops it on load), so a resume sets the base of the
  stage it lands in; the checkpoint's ``model_config`` records the base its
  weights were trained with, for the converters.
* TensorBoard: ``rope/base`` and ``seq_length`` at every log.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_patches.compat import require_signature
from megatron_patches.errors import ConfigError
from megatron_patches.hooks import Hook, HookContext, PhaseInfo, Requests, StepReport, number_option

if TYPE_CHECKING:
    import torch

    from megatron_patches.formats.model_config import ModelConfig
    from megatron_patches.training.config import Config as TrainConfig

require_signature(
    RotaryEmbedding.__init__,
    [
        "self",
        "kv_channels",
        "rotary_percent",
        "rotary_interleaved",
        "seq_len_interpolation_factor",
        "rotary_base",
        "rope_scaling",
        "rope_scaling_factor",
        "use_cpu_initialization",
        "cp_group",
    ],
)
require_signature(RotaryEmbedding.forward, ["self", "max_seq_len", "offset", "packed_seq", "cp_group"])


@dataclass(frozen=True)
class Stage:
    """One entry of ``patches.rope_schedule.stages``."""

    seq_length: int
    rotary_base: float
    until_tokens: float | None = None  # whole tokens; YAML reads 9e11 as a float (or a string)
    until_fraction: float | None = None  # of the run's tokens; neither on the last stage
    micro_batch_size: int | None = None

    @property
    def fraction(self) -> Fraction | None:
        """``until_fraction`` exactly as written: 0.9 is 9/10, not the nearest double."""
        return None if self.until_fraction is None else Fraction(str(self.until_fraction))


@dataclass(frozen=True)
class Options:
    """``patches.rope_schedule``."""

    stages: list[Stage]
    keep_tokens_per_iteration: bool = True

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("patches.rope_schedule.stages must be a non-empty list of stages")
        for i, stage in enumerate(self.stages):
            check_stage(stage, f"patches.rope_schedule.stages[{i}]", last=i == len(self.stages) - 1)


@dataclass(frozen=True)
class StageSpan:
    """A stage resolved to iterations and batch sizes."""

    start: int
    end: int  # exclusive
    seq_length: int
    rotary_base: float
    global_batch_size: int
    micro_batch_size: int


def check_stage(stage: Stage, where: str, last: bool) -> None:
    """Raise ConfigError naming the stage and the problem."""
    number_option(f"{where}.seq_length", stage.seq_length, integer=True)
    number_option(f"{where}.rotary_base", stage.rotary_base)
    if stage.micro_batch_size is not None:
        number_option(f"{where}.micro_batch_size", stage.micro_batch_size, integer=True)
    tokens, fraction = stage.until_tokens, stage.until_fraction
    if tokens is not None and fraction is not None:
        raise ConfigError(f"{where}: give until_tokens or until_fraction, not both")
    if last:
        if tokens is not None or (fraction is not None and fraction != 1):
            raise ConfigError(f"{where}: the last stage runs to the end of training; drop its until_*")
    elif tokens is None and fraction is None:
        raise ConfigError(f"{where} needs until_tokens or until_fraction (only the last stage has neither)")
    elif tokens is not None:
        number_option(f"{where}.until_tokens", tokens)
        if tokens != int(tokens):
            raise ConfigError(f"{where}.until_tokens must be a whole number of tokens, got {tokens}")
    else:
        number_option(f"{where}.until_fraction", fraction)
        if fraction >= 1:
            raise ConfigError(f"{where}.until_fraction must be below 1, got {fraction}")


def stage_batch(stage: Stage, base_tokens: int, base_batch: int, keep_tokens: bool, where: str) -> int:
    """The stage's global batch in sequences."""
    if not keep_tokens:
        return base_batch
    if base_tokens % stage.seq_length:
        raise ConfigError(
            f"{where}: keeping tokens per iteration at {base_tokens} (train.global_batch_size x "
            f"data.seq_length) needs a global batch of {base_tokens / stage.seq_length:g} sequences of "
            f"{stage.seq_length}; pick a seq_length dividing {base_tokens} or set "
            "patches.rope_schedule.keep_tokens_per_iteration: false"
        )
    return base_tokens // stage.seq_length


def plan_stages(
    stages: list[Stage], train_iters: int, batches: list[int], micro_batch: int
) -> list[StageSpan]:
    """Iteration spans of the stages; ``batches`` is each stage's global batch in sequences.

    Each non-last stage ends at a token count: ``until_tokens``, or
    ``until_fraction`` of the run's tokens. When stages differ in tokens per
    iteration the run's total depends on where they switch, so it is solved
    for first (iterations of all stages add up to ``train_iters``). A stage
    ends at the first iteration at which the tokens consumed reach its end.
    """
    per_iter = [b * s.seq_length for b, s in zip(batches, stages, strict=True)]
    total = _total_tokens(stages, train_iters, per_iter)
    spans, start, consumed = [], 0, 0
    for i, stage in enumerate(stages):
        where = f"patches.rope_schedule.stages[{i}]"
        if i == len(stages) - 1:
            end = train_iters
        else:
            target = int(stage.until_tokens) if stage.until_tokens is not None else stage.fraction * total
            end = start + max(math.ceil((target - consumed) / per_iter[i]), 0)
        if end <= start or (end >= train_iters and i < len(stages) - 1):
            raise ConfigError(
                f"{where} gets no iterations (it would run iterations {start}..{end - 1} of {train_iters}); "
                "until_* must increase and end before training does"
            )
        spans.append(
            StageSpan(
                start,
                end,
                stage.seq_length,
                stage.rotary_base,
                batches[i],
                stage.micro_batch_size or micro_batch,
            )
        )
        consumed += (end - start) * per_iter[i]
        start = end
    return spans


def _total_tokens(stages: list[Stage], train_iters: int, per_iter: list[int]) -> Fraction:
    """Solve sum_i (end_i - end_{i-1}) / per_iter_i = train_iters, each end = a + b * total."""
    ends = [(Fraction(int(s.until_tokens or 0)), s.fraction or Fraction(0)) for s in stages[:-1]] + [
        (Fraction(0), Fraction(1))
    ]
    constant = slope = Fraction(0)
    previous = (Fraction(0), Fraction(0))
    for (a, b), tokens in zip(ends, per_iter, strict=True):
        constant += (a - previous[0]) / tokens
        slope += (b - previous[1]) / tokens
        previous = (a, b)
    if slope <= 0:
        raise ConfigError("patches.rope_schedule: until_fraction values must increase, below 1")
    return (train_iters - constant) / slope


def split_phases(phases: list[PhaseInfo], spans: list[StageSpan]) -> list[PhaseInfo]:
    """Cut the data phases (main, anneal) at stage boundaries; each piece takes its stage's shape.

    The pieces do not carry the base: the patch looks it up by iteration (:meth:`RopeSchedule.span_at`).
    """
    out = []
    for phase in phases:
        for i, span in enumerate(spans):
            start, end = max(phase.start_iteration, span.start), min(phase.end_iteration, span.end)
            if start < end:
                out.append(
                    dataclasses.replace(
                        phase,
                        name=f"{phase.name}/stage{i}",
                        start_iteration=start,
                        end_iteration=end,
                        seq_length=span.seq_length,
                        global_batch_size=span.global_batch_size,
                        micro_batch_size=span.micro_batch_size,
                    )
                )
    return out


def set_rotary_base(model: torch.nn.Module, base: float, rope_scaling_factor: float) -> int:
    """Give the ``RotaryEmbedding`` of every ``GPTModel`` in ``model`` the frequencies of ``base``.

    ``GPTModel`` owns one ``RotaryEmbedding`` and hands its output to every
    attention layer of the stage. Returns how many were changed.
    """
    owners = [m for m in model.modules() if isinstance(getattr(m, "rotary_pos_emb", None), RotaryEmbedding)]
    everywhere = sum(isinstance(m, RotaryEmbedding) for m in model.modules())
    if everywhere != len(owners):
        raise RuntimeError(f"{everywhere} RotaryEmbedding modules but {len(owners)} owned by a GPTModel")
    for owner in owners:
        old = owner.rotary_pos_emb
        fresh = RotaryEmbedding(
            kv_channels=owner.config.kv_channels,
            rotary_percent=owner.rotary_percent,
            rotary_interleaved=old.rotary_interleaved,
            seq_len_interpolation_factor=old.seq_len_interpolation_factor,
            rotary_base=base,
            rope_scaling=owner.rotary_scaling,
            rope_scaling_factor=rope_scaling_factor,
            use_cpu_initialization=True,
            cp_group=old.cp_group,
        )
        old.inv_freq = fresh.inv_freq.to(old.inv_freq.device)
        owner.rotary_pos_emb_cache.clear()  # inference cos/sin
        owner.rotary_base = owner.config.rotary_base = base  # what export code reads
    RotaryEmbedding.forward.cache_clear()  # an lru_cache over all instances, keyed by self
    return len(owners)


class RopeSchedule(Hook):
    name = "rope_schedule"

    def __init__(self, spans: list[StageSpan], keep_tokens: bool) -> None:
        self.spans = spans
        self.keep_tokens = keep_tokens
        self.boundaries = {span.end for span in spans[:-1]}

    def span_at(self, iteration: int) -> StageSpan:
        """The stage that trains (0-based) ``iteration``."""
        return next(span for span in self.spans if span.start <= iteration < span.end)

    def describe(self) -> list[str]:
        return [
            f"rope_schedule: stage {i}: iterations {span.start}..{span.end - 1}, seq {span.seq_length}, "
            f"rotary base {span.rotary_base:g}"
            for i, span in enumerate(self.spans)
        ]

    def plan_phases(self, phases: list[PhaseInfo], config: TrainConfig) -> list[PhaseInfo]:
        return split_phases(phases, self.spans)

    def model_config(self, phase: PhaseInfo, model: ModelConfig) -> ModelConfig:
        return dataclasses.replace(model, rotary_base=self.span_at(phase.start_iteration).rotary_base)

    def on_phase_start(self, ctx: HookContext, phase: PhaseInfo) -> None:
        base = self.span_at(phase.start_iteration).rotary_base
        set_rotary_base(ctx.objects.model, base, ctx.cfg.model.rope_scaling_factor)
        batch = (
            f"{phase.tokens_per_iteration:,} tokens per iteration, kept constant"
            if self.keep_tokens
            else f"{phase.tokens_per_iteration:,} tokens per iteration"
        )
        ctx.writer.console(
            f"rope_schedule: from iteration {ctx.state.iteration}: seq_length {phase.seq_length}, "
            f"rotary base {base:g}, global batch {phase.global_batch_size} sequences ({batch})"
        )

    def after_step(self, ctx: HookContext, report: StepReport, requests: Requests) -> None:
        if report.iteration in self.boundaries:
            requests.save = requests.save or f"rope stage ends, the next starts at {report.iteration}"

    def on_log(self, ctx: HookContext, metrics: dict[str, float]) -> None:
        metrics["rope/base"] = float(self.span_at(ctx.phase.start_iteration).rotary_base)
        metrics["seq_length"] = float(ctx.phase.seq_length)


def enable(options: Options, config: TrainConfig) -> RopeSchedule:
    if config.model.position_embedding_type != "rope":
        raise ConfigError(
            f"patches.rope_schedule needs model.position_embedding_type rope, "
            f"got {config.model.position_embedding_type!r}"
        )
    keep, stages, train = options.keep_tokens_per_iteration, options.stages, config.train
    base_tokens = train.global_batch_size * config.data.seq_length
    batches = [
        stage_batch(s, base_tokens, train.global_batch_size, keep, f"patches.rope_schedule.stages[{i}]")
        for i, s in enumerate(stages)
    ]
    return RopeSchedule(plan_stages(stages, train.train_iters, batches, train.micro_batch_size), keep)
