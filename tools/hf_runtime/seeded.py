"""Temperature / top-p sampling with one random generator per sequence.

HF ``generate(do_sample=True)`` draws every row of a batch from the one global
RNG, so an item's sample depends on which items share its batch and on how
many batches came before it on the same process: a different ``--replicas``,
``--batch-size`` or a resume changes the outputs. :class:`SeededSampler` runs
inside a greedy ``generate`` as its last logits processor: it samples each row
with that row's own generator (seeded from the run's seed and the item's
position in the whole input) and leaves only the chosen token finite, so the
greedy step picks exactly that token.
"""

from __future__ import annotations

import torch

SEED_STRIDE = 0x9E3779B1  # spreads run seeds apart so (seed, position) pairs do not collide


def item_seed(seed: int, position: int) -> int:
    """The generator seed of the item at ``position`` (0-based, in the whole input) of a run."""
    return (seed * SEED_STRIDE + position) % 2**63


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` [B, V] with every token outside each row's top-p nucleus set to 0 (unnormalized)."""
    if top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # A token is outside when the tokens ranked before it already reach top_p.
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))


class SeededSampler:
    """A logits processor that samples each row with its own generator (see the module doc)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        self.seeds, self.temperature, self.top_p = seeds, temperature, top_p
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:  # created on first use: the scores' device is known only then
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        probs = nucleus(torch.softmax(scores.float() / self.temperature, dim=-1), self.top_p)
        picks = [
            torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators, strict=True)
        ]
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter(1, torch.stack(picks), 0.0)
