"""Probe scores computed by hand from a model's logits, one sequence at a time (test oracle)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

PROBES_YAML = """
- {name: paris, prefix: "the capital of france is", target: " paris."}
- {name: boils_ppl, text: "water boils at one hundred degrees."}
- {name: beijing_vs_tokyo, prefix: "the capital of china is", better: " beijing.", worse: " tokyo."}
- {name: capital_zh, prefix: "中国的首都是", target: "北京"}
"""


def hand_scores(tokenizer, logits_of: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """The scores of :data:`PROBES_YAML`; ``logits_of(ids [1, T]) -> logits [1, T, V]``."""

    def logprob(prefix: str, continuation: str) -> float:
        context = [tokenizer.eos_token_id] + tokenizer.encode(prefix, add_special_tokens=False)
        scored = tokenizer.encode(continuation, add_special_tokens=False)
        ids = torch.tensor([context + scored])
        with torch.no_grad():
            logp = torch.log_softmax(logits_of(ids[:, :-1])[0].double(), -1)
        return sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(scored))

    text = "water boils at one hundred degrees."
    count = len(tokenizer.encode(text, add_special_tokens=False))
    return {
        "paris": logprob("the capital of france is", " paris."),
        "boils_ppl": math.exp(-logprob("", text) / count),
        "beijing_vs_tokyo": logprob("the capital of china is", " beijing.")
        - logprob("the capital of china is", " tokyo."),
        "capital_zh": logprob("中国的首都是", "北京"),
    }
