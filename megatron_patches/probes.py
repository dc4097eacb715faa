"""Probes: after every evaluation, score a probe file on the live model and log ``probe/<name>``.

Config::

    patches:
      probes:
        file: probes.yaml          # see megatron_patches.probe_scoring for the format
        tokenizer: /path/hf_dir    # HF tokenizer dir (transformers.AutoTokenizer)
        micro_batch_size: 4        # probe rows per forward (default 4)

The probes run in ``on_eval`` (every ``logging.eval_interval``, on every rank).
All probe rows go through Megatron-Core's ``get_forward_backward_func()`` with
``forward_only=True`` (no pipelining, or the 1F1B schedule across PP stages), so
any TP/PP layout works. On the last stage the forward step calls ``GPTModel``
without labels and with ``runtime_gather_output=True``, which makes the output
layer all-gather the vocab-parallel logits over TP; the loss function turns
them into per-token log-probabilities with the same pure function the HF path
uses (``probe_scoring.token_logprobs``). The last stage then broadcasts the
per-row totals over its pipeline group, so every rank, the logging rank
included, logs the same numbers. Every DP replica scores all probes (they are
a handful of short rows).

Training is not perturbed: no optimizer state or gradient buffer is touched
(forward only), the data iterators are not read, the model is put in eval mode
and back, and every RNG stream (Python, NumPy, torch CPU/CUDA and Megatron's
CUDA-RNG tracker states) is saved before and restored after the probe forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_patches.compat import require_signature
from megatron_patches.errors import ConfigError
from megatron_patches.formats import rng_state
from megatron_patches.hooks import Hook, HookContext
from megatron_patches.parallel import model_chunks
from megatron_patches.probe_scoring import (
    ProbeBatch,
    check_rows_fit,
    load_probes,
    pack_rows,
    probe_rows,
    probe_scores,
    row_totals,
    token_logprobs,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from megatron_patches.probe_scoring import Probe
    from megatron_patches.training.config import Config as TrainConfig


@dataclass(frozen=True)
class Options:
    """``patches.probes``: the probe file, the tokenizer that reads it, rows per forward."""

    file: str
    tokenizer: str
    micro_batch_size: int = 4

    def __post_init__(self) -> None:
        for key in ("file", "tokenizer"):
            if not getattr(self, key):
                raise ConfigError(f"patches.probes needs '{key}'")
        if self.micro_batch_size < 1:
            raise ConfigError(
                f"patches.probes.micro_batch_size must be a positive integer, got {self.micro_batch_size!r}"
            )


def _check_pinned_api() -> None:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import schedules

    require_signature(
        GPTModel.forward,
        ["self", "input_ids", "position_ids", "attention_mask", "decoder_input", "labels"]
        + ["inference_context", "packed_seq_params", "extra_block_kwargs", "runtime_gather_output"],
    )
    keywords = ["forward_step_func", "data_iterator", "model", "num_microbatches", "seq_length"]
    keywords += ["micro_batch_size", "decoder_seq_length", "forward_only"]
    require_signature(schedules.forward_backward_no_pipelining, keywords)
    require_signature(schedules.forward_backward_pipelining_without_interleaving, keywords)


_check_pinned_api()


class ProbesHook(Hook):
    name = "probes"

    def __init__(
        self, probes: list[Probe], batch: ProbeBatch, vocab_size: int, micro_batch_size: int
    ) -> None:
        self.probes = probes
        self.batch = batch
        self.vocab_size = vocab_size
        self.micro_batch_size = micro_batch_size

    def on_eval(self, ctx: HookContext, metrics: dict[str, float]) -> None:
        sums, counts = score_rows(ctx.objects.model, self.batch, self.vocab_size, self.micro_batch_size)
        for name, value in probe_scores(self.probes, sums, counts).items():
            metrics[f"probe/{name}"] = value


def enable(options: Options, config: TrainConfig) -> ProbesHook:
    if not config.logging.eval_interval:
        raise ConfigError("patches.probes runs after each evaluation: set logging.eval_interval")
    probes = load_probes(options.file)
    tokenizer = load_tokenizer(options.tokenizer)
    rows = probe_rows(probes, tokenizer)
    check_rows_fit(rows, config.model.vocab_size, config.model.max_position_embeddings, "patches.probes")
    batch = pack_rows(rows, pad_id=rows[0].tokens[0], micro_batch_size=options.micro_batch_size)
    return ProbesHook(probes, batch, config.model.vocab_size, options.micro_batch_size)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    if not Path(path).is_dir():
        raise ConfigError(f"tokenizer directory {path} does not exist")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def score_rows(
    model: torch.nn.Module, batch: ProbeBatch, vocab_size: int, micro_batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective over the model-parallel world: (per-row log-prob sums, scored-token counts).

    ``model`` is this rank's stage (wrapped or not); every rank returns the same
    two float64 tensors of ``batch.rows`` entries.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro_batches = [
        {key: getattr(batch, key)[i : i + micro_batch_size] for key in ("tokens", "labels", "mask")}
        for i in range(0, batch.tokens.shape[0], micro_batch_size)
    ]
    chunks = model_chunks(model)
    scored = len(micro_batches)
    if len(chunks) > 1:  # the interleaved schedule runs micro-batches in groups of PP: pad, then drop
        micro_batches += [micro_batches[-1]] * (-scored % ps.get_pipeline_model_parallel_world_size())
    with preserved_rng(), eval_mode(model), torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, vocab_size),
            data_iterator=[iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=batch.seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    device = next(model.parameters()).device
    totals = torch.zeros((2, batch.tokens.shape[0]), dtype=torch.float64, device=device)
    if reports:  # last pipeline stage
        logprobs = torch.cat([r["token_logprobs"] for r in reports[:scored]])
        totals[0], totals[1] = row_totals(logprobs, batch.mask)
    _from_last_stage(totals)
    return totals[0, : batch.rows].cpu(), totals[1, : batch.rows].cpu()


def _forward_step(vocab_size: int, data_iterator, model):
    micro = next(data_iterator)
    device = next(model.parameters()).device
    tokens = micro["tokens"].to(device)
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    logits = model(tokens, positions, None, runtime_gather_output=True)
    return logits, partial(_log_probs, vocab_size, micro)


def _log_probs(vocab_size: int, micro: dict, logits: torch.Tensor):
    """Megatron's 3-tuple loss (unused in forward-only) carrying the per-token log-probs."""
    mask = micro["mask"].to(logits.device)
    logprobs = token_logprobs(logits, micro["labels"].to(logits.device), vocab_size) * mask
    return -logprobs.sum(), mask.sum().to(torch.int), {"token_logprobs": logprobs}


def _from_last_stage(totals: torch.Tensor) -> None:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            totals,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave every RNG stream exactly as found, whatever runs inside."""
    saved = rng_state.capture()
    try:
        yield
    finally:
        rng_state.restore(saved)
