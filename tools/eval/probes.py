"""``python -m tools.eval probes``: the training probe file scored on an HF export.

Same file format, same tokenization and the same pure scoring functions
(``megatron_patches.probe_scoring``) as the in-training ``probes`` patch, so a
converted checkpoint gives the numbers the run logged as ``probe/<name>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_patches.probe_scoring import (
    Probe,
    check_rows_fit,
    pack_rows,
    probe_rows,
    probe_scores,
    row_totals,
    token_logprobs,
)
from tools.hf_runtime.loading import model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def score_hf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    probes: list[Probe],
    vocab_size: int | None = None,
    micro_batch_size: int = 8,
) -> dict[str, float]:
    """``{probe name: score}`` on an HF causal LM.

    ``vocab_size`` is the real vocabulary the softmax runs over (default: the
    model config's); pass the training config's ``model.vocab_size`` when an
    export kept Megatron's padded rows.
    """
    vocab_size = vocab_size or model.config.vocab_size
    rows = probe_rows(probes, tokenizer)
    positions = getattr(model.config, "max_position_embeddings", 1 << 30)
    check_rows_fit(rows, vocab_size, positions, "probes")
    batch = pack_rows(rows, pad_id=rows[0].tokens[0], micro_batch_size=micro_batch_size)
    device = model_device(model)
    sums, counts = [], []
    with torch.no_grad():
        for i in range(0, batch.tokens.shape[0], micro_batch_size):
            window = slice(i, i + micro_batch_size)
            logits = model(input_ids=batch.tokens[window].to(device)).logits
            logprobs = token_logprobs(logits, batch.labels[window].to(device), vocab_size)
            row_sum, row_count = row_totals(logprobs, batch.mask[window])
            sums.append(row_sum.cpu())
            counts.append(row_count.cpu())
    return probe_scores(probes, torch.cat(sums)[: batch.rows], torch.cat(counts)[: batch.rows])
