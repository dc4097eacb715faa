"""Probe files, and the scoring math shared by in-training probes and ``tools/eval probes``.

A probe file is YAML (a list of mappings) or JSONL (one mapping a line). Each
entry is one of:

- ``{name, prefix, target}``: the log-probability (natural log, summed over the
  target's tokens) of ``target`` continuing ``prefix``;
- ``{name, text}``: the perplexity of ``text`` (exp of the mean negative
  log-probability of its tokens);
- ``{name, better, worse}`` (optionally with ``prefix``): the log-likelihood
  margin log p(better) - log p(worse), each scored as a continuation of ``prefix``.

Every sequence starts with the tokenizer's BOS token, or its EOS token when it
has no BOS (in pretraining a document starts after the previous document's
end-of-document token), so every token of a text or target is predicted from
some context. Prefix and continuation are tokenized separately, without special
tokens: the scored span is exactly the continuation's own tokens.

Scoring is pure and shared, so the Megatron patch and the HF path give the same
numbers from the same logits: :func:`token_logprobs` (logits -> log-probability
of each label over the real vocabulary, padding rows of a TP-padded vocabulary
excluded), :func:`row_totals` and :func:`probe_scores`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from megatron_patches.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

KINDS = {"target": ("prefix", "target"), "ppl": ("text",), "margin": ("better", "worse")}
OPTIONAL = {"margin": ("prefix",)}


@dataclass(frozen=True)
class Probe:
    name: str
    kind: str  # "target" | "ppl" | "margin"
    prefix: str
    continuations: tuple[str, ...]  # target: (target,); ppl: (text,); margin: (better, worse)


@dataclass(frozen=True)
class Row:
    """One sequence to score: ``tokens[first:]`` are the scored tokens."""

    tokens: tuple[int, ...]
    first: int


@dataclass
class ProbeBatch:
    """Rows padded to one length and to a multiple of the micro-batch size."""

    tokens: torch.Tensor  # [n, L] inputs
    labels: torch.Tensor  # [n, L] next tokens
    mask: torch.Tensor  # [n, L] 1.0 where the label is a scored token
    rows: int  # real rows; the rest are padding rows with an all-zero mask

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]


def load_probes(path: str | Path) -> list[Probe]:
    """Read and validate a probe file; every problem names the file and the entry."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"probe file {path} does not exist")
    entries = _read_entries(path)
    if not entries:
        raise ConfigError(f"probe file {path} has no probes")
    probes = [_parse_entry(entry, f"{path} entry {i + 1}") for i, entry in enumerate(entries)]
    names = [p.name for p in probes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"probe file {path}: duplicate probe names {duplicates}")
    return probes


def _looks_like_jsonl(text: str) -> bool:
    """One JSON object a line, whatever the file is called (YAML would read it as one mapping)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return bool(lines) and all(line.startswith("{") and line.endswith("}") for line in lines)


def _read_entries(path: Path) -> list:
    """The entries of a JSONL (by suffix or by content) or YAML probe file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or _looks_like_jsonl(text):
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"probe file {path} line {number} is not JSON: {err.msg}") from None
        return entries
    try:
        entries = yaml.safe_load(text) or []
    except yaml.YAMLError as err:
        raise ConfigError(f"probe file {path} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(entries, list):
        raise ConfigError(f"probe file {path} must hold a list of probes")
    return entries


def _parse_entry(entry, where: str) -> Probe:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping, got {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where} needs a non-empty 'name'")
    fields = set(entry) - {"name"}
    for kind, required in KINDS.items():
        if fields >= set(required) and fields <= set(required) | set(OPTIONAL.get(kind, ())):
            values = {key: entry[key] for key in fields}
            bad = [key for key, value in values.items() if not isinstance(value, str)]
            if bad:
                raise ConfigError(f"{where} ({name}): {bad} must be strings")
            prefix = values.pop("prefix", "")
            return Probe(name, kind, prefix, tuple(values[key] for key in required if key != "prefix"))
    raise ConfigError(
        f"{where} ({name}) has keys {sorted(fields)}; a probe is one of "
        "{prefix, target}, {text}, {better, worse} (with optional prefix)"
    )


def start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The context every probe sequence starts from: BOS, else EOS (a document boundary)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ConfigError("the probe tokenizer has neither a BOS nor an EOS token to start sequences from")


def probe_rows(probes: list[Probe], tokenizer: PreTrainedTokenizerBase) -> list[Row]:
    """Tokenize every probe into its rows (1 for target/ppl, 2 for margin), in order."""
    start = start_token(tokenizer)
    rows = []
    for probe in probes:
        prefix = _encode(tokenizer, probe.prefix)
        for continuation in probe.continuations:
            scored = _encode(tokenizer, continuation)
            if not scored:
                raise ConfigError(
                    f"probe {probe.name!r}: {continuation!r} tokenizes to nothing; nothing to score"
                )
            rows.append(Row((start, *prefix, *scored), 1 + len(prefix)))
    return rows


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def check_rows_fit(rows: list[Row], vocab_size: int, max_positions: int, where: str) -> None:
    """Every token id inside the model's vocabulary, every row inside its context window."""
    top = max(max(row.tokens) for row in rows)
    if top >= vocab_size:
        raise ConfigError(
            f"{where}: the tokenizer gives token id {top} but the model's vocab_size is {vocab_size}"
        )
    longest = max(len(row.tokens) for row in rows) - 1
    if longest > max_positions:
        raise ConfigError(
            f"{where}: the longest probe needs {longest} positions, the model has {max_positions}"
        )


def pack_rows(rows: list[Row], pad_id: int, micro_batch_size: int = 1) -> ProbeBatch:
    """Right-pad rows into inputs/labels/mask; causal attention keeps padding out of real positions."""
    length = max(len(row.tokens) for row in rows) - 1
    count = -(-len(rows) // micro_batch_size) * micro_batch_size
    tokens = torch.full((count, length), pad_id, dtype=torch.long)
    labels = torch.full((count, length), pad_id, dtype=torch.long)
    mask = torch.zeros((count, length), dtype=torch.float32)
    for i, row in enumerate(rows):
        n = len(row.tokens) - 1
        tokens[i, :n] = torch.tensor(row.tokens[:-1])
        labels[i, :n] = torch.tensor(row.tokens[1:])
        mask[i, row.first - 1 : n] = 1.0  # label at position p is token p + 1
    return ProbeBatch(tokens, labels, mask, len(rows))


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(label) at every position, in fp32, normalized over the first ``vocab_size`` logits.

    ``logits`` is ``[b, s, V]`` with ``V >= vocab_size`` (Megatron pads the
    vocabulary to a multiple of 128 x TP; those rows are no tokens).
    """
    logp = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def row_totals(logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of scored log-probs, number of scored tokens) per row, float64."""
    mask = mask.to(logprobs.device, torch.float64)
    return (logprobs.double() * mask).sum(-1), mask.sum(-1)


def probe_scores(probes: list[Probe], sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """One number per probe from its rows' totals (rows in :func:`probe_rows` order)."""
    sums, counts = [float(x) for x in sums], [float(x) for x in counts]
    scores, i = {}, 0
    for probe in probes:
        if probe.kind == "target":
            scores[probe.name] = sums[i]
        elif probe.kind == "ppl":
            scores[probe.name] = math.exp(-sums[i] / counts[i])
        else:
            scores[probe.name] = sums[i] - sums[i + 1]
        i += len(probe.continuations)
    return scores
