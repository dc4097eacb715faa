"""Batched and streaming generation on an HF causal LM (used by tools/infer and tools/eval bench).

Batches are left-padded so every prompt ends where generation starts; decoding
is greedy unless a temperature is given, and then each item is sampled with its
own generator (``tools/hf_runtime/seeded.py``). ``stop`` ends a sequence at the first
occurrence of that string in its new text (the text is cut there), so a batch
stops as soon as every sequence has met it or ``max_new_tokens`` is reached.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import torch

from megatron_patches.errors import ConfigError
from tools.hf_runtime.seeded import SeededSampler, item_seed

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: str | None = None
    seed: int = 0

    def generate_kwargs(self, tokenizer: PreTrainedTokenizerBase, positions: Sequence[int]) -> dict:
        """``model.generate`` arguments for a batch of the items at ``positions`` in the whole input.

        Decoding is always greedy as HF sees it; with a temperature, :class:`SeededSampler` picks
        each token, so an item's output depends on the seed and its position only.
        """
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
        }
        if self.temperature > 0:
            from transformers import LogitsProcessorList

            seeds = [item_seed(self.seed, p) for p in positions]
            sampler = SeededSampler(seeds, self.temperature, self.top_p)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        return kwargs


def check_sampling(sampling: Sampling) -> None:
    if sampling.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
    if sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
        raise ConfigError(
            f"temperature must be >= 0 and top_p in (0, 1], got {sampling.temperature}, {sampling.top_p}"
        )


class _StopString:
    """Per-sequence stopping criterion: the new text contains ``stop``."""

    def __init__(self, tokenizer, stop: str, prompt_length: int) -> None:
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([self.stop in t for t in texts], device=input_ids.device)


def _stopping(tokenizer: PreTrainedTokenizerBase, sampling: Sampling, prompt_length: int) -> list:
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList(
        [_StopString(tokenizer, sampling.stop, prompt_length)] if sampling.stop else []
    )


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    sampling: Sampling,
    batch_size: int = 8,
    positions: Sequence[int] | None = None,
) -> list[str]:
    """The continuation of each prompt (new text only, cut at ``sampling.stop``), in order.

    ``positions`` are the prompts' places in the whole input (default 0, 1, ...); with a
    temperature they seed each prompt's sampling, so outputs do not depend on batching.
    """
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    tokenizer.padding_side = "left"
    positions = range(len(prompts)) if positions is None else positions
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        length = batch["input_ids"].shape[1]
        kwargs = sampling.generate_kwargs(tokenizer, positions[start : start + batch_size])
        with torch.no_grad():
            ids = model.generate(**batch, stopping_criteria=_stopping(tokenizer, sampling, length), **kwargs)
        texts = tokenizer.batch_decode(ids[:, length:], skip_special_tokens=True)
        outputs += [t.split(sampling.stop, 1)[0] if sampling.stop else t for t in texts]
    return outputs


def stream(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    sampling: Sampling,
    out: TextIO = sys.stdout,
) -> str:
    """Generate for one prompt, writing text to ``out`` as tokens arrive (cut at ``sampling.stop``
    like :func:`generate`); returns the text."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    batch = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    length = batch["input_ids"].shape[1]
    # Position 0: the same text as the first item of a batch run with this prompt and seed.
    kwargs = {**batch, "streamer": streamer, "stopping_criteria": _stopping(tokenizer, sampling, length)}
    kwargs.update(sampling.generate_kwargs(tokenizer, [0]))
    worker = Thread(target=lambda: _generate_no_grad(model, kwargs), daemon=True)
    worker.start()
    text = relay_until_stop(streamer, out, sampling.stop)
    worker.join()
    out.write("\n")
    return text


def relay_until_stop(pieces: Iterable[str], out: TextIO, stop: str | None) -> str:
    """Write ``pieces`` to ``out`` as they come, ending before the first ``stop``; returns the text.

    The last ``len(stop) - 1`` characters are held back until the next piece shows they do not
    begin a stop string split across pieces.
    """
    text, written = "", 0
    hold = len(stop) - 1 if stop else 0
    for piece in pieces:
        text += piece
        if stop and stop in text:
            text = text.split(stop, 1)[0]
            break
        if len(text) - hold > written:
            out.write(text[written : len(text) - hold])
            out.flush()
            written = len(text) - hold
    out.write(text[written:])
    out.flush()
    return text


def _generate_no_grad(model, kwargs: dict) -> None:
    with torch.no_grad():
        model.generate(**kwargs)
