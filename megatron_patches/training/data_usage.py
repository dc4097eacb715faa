"""Data usage, counted: tokens consumed per channel and uses of every document, from Megatron's indices.

Which data a run consumed is a pure function of the iteration (``data.phase_sample_offset``) and
the skipped windows (``skip_windows``), so nothing is logged per sample. The dataset ids read by
iterations ``a .. b-1`` of a phase are mapped through Megatron-Core's own index files:

* ``BlendedDataset.dataset_index[i]`` / ``dataset_sample_index[i]``: the blend component of
  sample ``i`` and its sample in that component (a one-prefix blend is the ``GPTDataset`` itself);
* ``GPTDataset.shuffle_index[j]`` -> ``k``; ``sample_index[k]`` and ``sample_index[k + 1]`` hold
  ``(position in document_index, token offset)`` of the sample's first and last document, and
  ``document_index[first .. last]`` (both included) are the documents whose tokens it reads, the
  range ``GPTDataset._query_document_sample_shuffle_indices`` walks.

Counting is incremental (:class:`Tally`): each call adds only the iterations since the last one,
and starts over when the run goes back (a roll-back) or its skipped windows change.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from megatron_patches.formats.usage import write_usage
from megatron_patches.training import skip_windows
from megatron_patches.training.data import Phase, parse_blend, phase_sample_offset


def consumed_ids(phases: list[Phase], phase: Phase, begin: int, end: int, spans: list) -> np.ndarray:
    """Sample ids of ``phase``'s dataset read by its iterations ``begin .. end-1`` (windows skipped)."""
    begin, end = max(begin, phase.start_iteration), min(end, phase.end_iteration)
    if end <= begin:
        return np.zeros(0, dtype=np.int64)
    first = phase_sample_offset(phases, begin)
    return shifted(np.arange(first, first + (end - begin) * phase.global_batch_size, dtype=np.int64), spans)


def shifted(positions: np.ndarray, spans: list) -> np.ndarray:
    """:func:`skip_windows.dataset_index` of every position at once (same order of windows)."""
    ids = positions.copy()
    for start, end in spans:
        ids += (ids >= start) * (end - start + 1)
    return ids


def components(dataset) -> list[tuple[object, Callable[[np.ndarray], np.ndarray]]]:
    """``(GPTDataset, ids -> its sample ids)`` per blend component, by ``dataset_id``."""
    if not hasattr(dataset, "dataset_index"):
        return [(dataset, lambda ids: ids)]
    index, sample_index = np.asarray(dataset.dataset_index), np.asarray(dataset.dataset_sample_index)

    def picker(k: int) -> Callable[[np.ndarray], np.ndarray]:
        return lambda ids: sample_index[ids[index[ids] == k]]

    return [(part, picker(k)) for k, part in enumerate(dataset.datasets)]


def channel_samples(dataset, ids: np.ndarray, channels: int) -> np.ndarray:
    """Samples per blend component among ``ids``."""
    if not hasattr(dataset, "dataset_index"):
        return np.array([len(ids)] + [0] * (channels - 1), dtype=np.int64)
    return np.bincount(np.asarray(dataset.dataset_index)[ids], minlength=channels).astype(np.int64)


def document_uses(gpt_dataset, sample_ids: np.ndarray) -> np.ndarray:
    """Uses of each document (sequence of the ``.idx``) by the samples ``sample_ids`` of a GPTDataset."""
    documents = len(gpt_dataset.dataset.sequence_lengths)
    if len(sample_ids) == 0:
        return np.zeros(documents, dtype=np.int64)
    k = np.asarray(gpt_dataset.shuffle_index)[sample_ids]
    sample_index = np.asarray(gpt_dataset.sample_index)
    first, last = sample_index[k, 0].astype(np.int64), sample_index[k + 1, 0].astype(np.int64)
    spans = last - first + 1
    # positions first..last of every sample, concatenated: a ramp restarted at each sample's first
    starts = np.repeat(first - np.cumsum(spans) + spans, spans)
    positions = starts + np.arange(int(spans.sum()), dtype=np.int64)
    docs = np.asarray(gpt_dataset.document_index)[positions]
    return np.bincount(docs, minlength=documents).astype(np.int64)


class Tally:
    """Running totals over the iterations consumed so far, per phase, added incrementally."""

    def __init__(self, count: Callable[[object, Phase, np.ndarray], np.ndarray | dict]) -> None:
        self.count = count  # (dataset, phase, new sample ids) -> what to add
        self.done: dict[str, tuple[int, tuple]] = {}  # phase name -> (iterations counted, windows)
        self.totals: dict[str, object] = {}

    def update(self, phases: list[Phase], datasets: dict, iteration: int, windows: list) -> dict:
        """Totals per phase name after ``iteration`` iterations; ``datasets``: phase name -> train set."""
        for phase in phases:
            spans = skip_windows.of_phase(windows, phase.name)
            before, seen = self.done.get(phase.name, (phase.start_iteration, tuple(spans)))
            end = min(max(iteration, phase.start_iteration), phase.end_iteration)
            if end < before or seen != tuple(spans):  # went back, or a window was added: recount
                before = phase.start_iteration
                self.totals.pop(phase.name, None)
            if end > before:
                new = consumed_ids(phases, phase, before, end, spans)
                added = self.count(datasets[phase.name], phase, new)
                self.totals[phase.name] = _add(self.totals.get(phase.name), added)
            self.done[phase.name] = (end, tuple(spans))
        return self.totals


def _add(total, added):
    if total is None:
        return added
    if isinstance(added, dict):
        return {key: total[key] + value for key, value in added.items()}
    return total + added


def channel_tokens(totals: dict, phases: list[Phase]) -> dict[str, int]:
    """``{channel: tokens}`` over the phases (samples x the phase's sequence length)."""
    tokens: dict[str, int] = {}
    for phase in phases:
        for name, samples in zip(phase.channels, totals.get(phase.name, []), strict=False):
            tokens[name] = tokens.get(name, 0) + int(samples) * phase.seq_length
    return tokens


def count_channel_samples(dataset, phase: Phase, ids: np.ndarray) -> np.ndarray:
    return channel_samples(dataset, ids, max(len(phase.channels), 1))


def count_documents(dataset, phase: Phase, ids: np.ndarray) -> dict[str, np.ndarray]:
    """``{prefix: uses per document}`` of one phase's samples ``ids``."""
    return {part.dataset.path_prefix: document_uses(part, pick(ids)) for part, pick in components(dataset)}


def merge_documents(totals: dict) -> dict[str, np.ndarray]:
    """Per-prefix counts summed over phases (two phases may read one prefix)."""
    merged: dict[str, np.ndarray] = {}
    for per_prefix in totals.values():
        for prefix, counts in per_prefix.items():
            merged[prefix] = merged[prefix] + counts if prefix in merged else counts.copy()
    return merged


class DataUsage:
    """The run's usage accounting: ``channel_tokens_total/<name>`` at each log, counts at each checkpoint."""

    def __init__(self) -> None:
        self.tokens = Tally(count_channel_samples)
        self.documents = Tally(count_documents)

    def channel_metrics(self, data, iteration: int) -> dict[str, float]:
        """TensorBoard scalars: tokens each channel has fed the model so far (every rank: may build)."""
        totals = self.tokens.update(data.phases, data.train_datasets(iteration), iteration, data.skipped)
        return {f"channel_tokens_total/{k}": float(v) for k, v in channel_tokens(totals, data.phases).items()}

    def write_counts(self, data, iteration: int, checkpoint_dir: Path, rank: int) -> None:
        """Rank 0 writes ``<checkpoint>/usage``; every rank calls (building a past phase is collective)."""
        datasets = data.train_datasets(iteration)
        if rank != 0 or not any(p.data_path for p in data.phases):
            return
        totals = self.documents.update(data.phases, datasets, iteration, data.skipped)
        names = {
            prefix: name
            for phase in data.phases
            for name, prefix in zip(phase.channels, parse_blend(phase.data_path)[0], strict=False)
        }
        write_usage(checkpoint_dir, merge_documents(totals), names, iteration)
