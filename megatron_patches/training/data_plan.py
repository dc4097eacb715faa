"""The data plan: per channel, tokens available, tokens the run will consume, and the implied epochs.

Consumed tokens of a channel = sum over the phases reading it of iterations x global batch x
sequence length x the channel's normalized blend weight (Megatron-Core's ``BlendedDataset``
draws samples in those proportions). Available tokens are the prefix's ``.bin`` tokens times the
train share of ``data.split`` (Megatron-Core splits by documents, so this is the expected share).
A channel read more than ``data.max_epochs`` times is refused before anything is built: repeating
data beyond ~4 epochs adds little (Muennighoff et al. 2023, "Scaling Data-Constrained Language
Models"), so the run is more likely a wrong weight or ``train_iters`` than a plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_patches.errors import ConfigError
from megatron_patches.formats.indexed import token_count
from megatron_patches.training.data import Phase, parse_blend, split_weights


@dataclass(frozen=True)
class ChannelUse:
    name: str
    prefix: str
    available: int  # tokens of the train split
    consumed: int  # tokens the run will read

    @property
    def epochs(self) -> float:
        return self.consumed / self.available if self.available else float("inf")


def channel_uses(phases: list[Phase], split: str) -> list[ChannelUse]:
    """One :class:`ChannelUse` per prefix the phases read (a prefix in two phases adds up); none for mock."""
    weights = split_weights(split)
    train_share = weights[0] / sum(weights)
    consumed: dict[str, float] = {}
    names: dict[str, str] = {}
    for phase in phases:
        if not phase.data_path:
            continue
        prefixes, blend = parse_blend(phase.data_path)
        total = sum(blend)
        for name, prefix, weight in zip(phase.channels, prefixes, blend, strict=True):
            tokens = phase.iterations * phase.tokens_per_iteration * weight / total
            consumed[prefix] = consumed.get(prefix, 0.0) + tokens
            names.setdefault(prefix, name)
    return [ChannelUse(names[p], p, int(token_count(p) * train_share), round(consumed[p])) for p in consumed]


def check_max_epochs(uses: list[ChannelUse], max_epochs: float | None) -> None:
    """Refuse, in one line, the channels the run would read more than ``data.max_epochs`` times."""
    if max_epochs is None:
        return
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, (int, float)) or max_epochs <= 0:
        raise ConfigError(f"data.max_epochs must be a positive number or null, got {max_epochs!r}")
    over = [u for u in uses if u.epochs > max_epochs]
    if over:
        listed = ", ".join(
            f"{u.name} {u.epochs:.2f} epochs ({u.consumed:,} of {u.available:,} tokens)" for u in over
        )
        raise ConfigError(
            f"the run would read channel(s) beyond data.max_epochs={max_epochs:g}: {listed}; add data, "
            "lower the weight or train_iters, or raise data.max_epochs (null: no limit)"
        )


def describe(uses: list[ChannelUse]) -> list[str]:
    """Plan lines: ``usage <channel>: <available> tokens available, <consumed> to consume (<e> epochs)``."""
    return [
        f"usage {u.name}: {u.available:,} tokens available, {u.consumed:,} to consume ({u.epochs:.2f} epochs)"
        for u in uses
    ]
