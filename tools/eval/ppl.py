"""``python -m tools.eval ppl``: loss and perplexity per held-out channel on an HF export.

A channel is a JSONL file of documents (``{"text": ...}`` a line; a directory
of them gives one channel per file, named by its stem) or a Megatron
``.bin/.idx`` prefix (already tokenized; named by its basename without
``_text_document``). As in pretraining, a channel's documents (each followed by
the tokenizer's EOS) are one token stream, cut into windows of
``seq_length + 1`` tokens; each window predicts its last ``seq_length`` tokens
from the ones before and starts at the last token of the window before it, as
Megatron's GPT samples overlap by one token, so every token of the stream but
its first is predicted exactly once. Loss is the token-weighted mean negative
log-likelihood (nats), PPL its exponential, and the predicted tokens are counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats.indexed import DOCUMENT_SUFFIX, check_prefix
from megatron_patches.probe_scoring import token_logprobs
from tools.hf_runtime.loading import model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Channel:
    name: str
    path: Path
    kind: str  # "jsonl" | "indexed" (path is then the prefix)


@dataclass
class ChannelResult:
    channel: str
    tokens: int
    loss: float
    skipped: tuple[str, ...] = ()  # "file:line: reason" of each unreadable JSONL line

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))


def find_channels(paths: list[str]) -> list[Channel]:
    """Channels named by ``--data`` entries: JSONL files, directories of them, .bin/.idx prefixes."""
    channels = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = [Channel(p.stem, p, "jsonl") for p in sorted(path.glob("*.jsonl"))]
            found += [_indexed(p.with_suffix("")) for p in sorted(path.glob("*.idx"))]
            if not found:
                raise ConfigError(f"held-out directory {path} has no *.jsonl files and no .bin/.idx pairs")
            channels += found
        elif path.suffix == ".jsonl" and path.is_file():
            channels.append(Channel(path.stem, path, "jsonl"))
        elif Path(f"{item}.idx").is_file():
            channels.append(_indexed(path))
        else:
            raise ConfigError(
                f"held-out data {item} is neither a JSONL file, a directory nor a .bin/.idx prefix"
            )
    names = [c.name for c in channels]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"two held-out sources have the same channel name: {duplicates}")
    return channels


def _indexed(prefix: Path) -> Channel:
    check_prefix(str(prefix))
    return Channel(prefix.name.removesuffix(DOCUMENT_SUFFIX), prefix, "indexed")


def channel_documents(
    channel: Channel, tokenizer: PreTrainedTokenizerBase, text_key: str, skipped: list[str]
) -> Iterator[list[int]]:
    """Token ids of each document, EOS-terminated; unreadable JSONL lines go to ``skipped``."""
    if channel.kind == "indexed":
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(str(channel.path))
        for i in range(len(dataset)):
            yield [int(t) for t in dataset[i]]
        return
    with channel.path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
                assert isinstance(text, str)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                skipped.append(f"{channel.path}:{number}: no string {text_key!r}")
                continue
            yield [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]


def windows(documents: Iterator[list[int]], seq_length: int, max_tokens: int | None) -> Iterator[list[int]]:
    """Windows of ``seq_length + 1`` tokens over the document stream (the last may be shorter), each
    overlapping the one before by one token: that token is the last one the window before predicts
    and the first input of the next, so no token goes unpredicted."""
    buffer: list[int] = []
    predicted = 0
    for document in documents:
        buffer.extend(document)
        while len(buffer) >= seq_length + 1:
            window, buffer = buffer[: seq_length + 1], buffer[seq_length:]
            yield window
            predicted += seq_length
            if max_tokens and predicted >= max_tokens:
                return
    if len(buffer) >= 2:
        yield buffer


def score_windows(
    model: PreTrainedModel, windows_: Iterator[list[int]], batch_size: int, vocab_size: int
) -> tuple[float, int]:
    """(sum of log-probs, predicted tokens) over all windows, batching equal lengths."""
    device = model_device(model)
    total, count, batch = 0.0, 0, []

    def flush() -> None:
        nonlocal total, count
        ids = torch.tensor(batch, device=device)
        if ids.max().item() >= vocab_size:
            raise ConfigError(f"token id {ids.max().item()} is outside the model's vocabulary ({vocab_size})")
        with torch.no_grad():
            logits = model(input_ids=ids[:, :-1]).logits
        total += token_logprobs(logits, ids[:, 1:], vocab_size).double().sum().item()
        count += ids[:, 1:].numel()
        batch.clear()

    for window in windows_:
        if batch and (len(window) != len(batch[0]) or len(batch) == batch_size):
            flush()
        batch.append(window)
    if batch:
        flush()
    return total, count


def evaluate_channels(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    channels: list[Channel],
    seq_length: int,
    batch_size: int = 4,
    max_tokens: int | None = None,
    text_key: str = "text",
) -> list[ChannelResult]:
    vocab_size = model.config.vocab_size
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token to end documents with")
    results = []
    for channel in channels:
        skipped: list[str] = []
        docs = channel_documents(channel, tokenizer, text_key, skipped)
        try:
            total, count = score_windows(model, windows(docs, seq_length, max_tokens), batch_size, vocab_size)
        except ConfigError as err:
            raise ConfigError(f"held-out channel {channel.name} ({channel.path}): {err}") from None
        if not count:
            raise ConfigError(f"held-out channel {channel.name} ({channel.path}) has no tokens to score")
        results.append(ChannelResult(channel.name, count, -total / count, tuple(skipped)))
    return results


def format_table(results: list[ChannelResult]) -> str:
    lines = [f"{'channel':<20} {'tokens':>12} {'loss':>9} {'ppl':>11} {'skipped':>8}"]
    lines += [
        f"{r.channel:<20} {r.tokens:>12,} {r.loss:>9.4f} {r.ppl:>11.3f} {len(r.skipped):>8}" for r in results
    ]
    return "\n".join(lines)
