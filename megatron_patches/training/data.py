"""Training data: Megatron-Core ``GPTDataset``/``BlendedDataset`` over ``.bin/.idx`` blends, in phases.

A run reads its data in *phases*: the main blend, then optionally an anneal
blend for the final fraction of iterations, and any sequence-length stages a
patch adds. Each phase builds its own ``BlendedMegatronDatasetBuilder`` datasets
(train and valid) for its blend and sequence length. Where a phase reads a
sample is a pure function of the iteration (:func:`phase_sample_offset`), so
resuming needs nothing but the iteration number: the consumed-samples count is
derived and checked, never guessed.

Every sample carries ``dataset_id``, its blend component: ``BlendedDataset``
returns it, and a single-prefix blend gets 0. The channel-loss patch reads it on
the last pipeline stage.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats.indexed import DOCUMENT_SUFFIX, check_prefix
from megatron_patches.training import skip_windows
from megatron_patches.training.read_ahead import ReadAhead

if TYPE_CHECKING:
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from megatron_patches.training.config import DataConfig


@dataclass(frozen=True)
class Phase:
    """A span of iterations reading one blend at one sequence length and batch size."""

    name: str
    start_iteration: int
    end_iteration: int  # exclusive
    data_path: tuple  # (w1, prefix1, w2, prefix2, ...); empty for mock data
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    channels: tuple = ()  # channel name of each blend component (dataset_id -> name)

    @property
    def iterations(self) -> int:
        return self.end_iteration - self.start_iteration

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length


def parse_blend(data_path: list | tuple) -> tuple[list[str], list[float]]:
    """Split Megatron's ``[w1, p1, w2, p2, ...]`` (or a bare ``[p]``) into prefixes and weights."""
    items = list(data_path)
    if len(items) == 1 and isinstance(items[0], str):
        return [items[0]], [1.0]
    if len(items) % 2 or not items:
        raise ConfigError(f"data_path must be [weight, prefix, weight, prefix, ...], got {items}")
    weights, prefixes = items[0::2], items[1::2]
    for weight, prefix in zip(weights, prefixes, strict=True):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"data_path weight {weight!r} (for {prefix!r}) must be a positive number")
        if not isinstance(prefix, str):
            raise ConfigError(f"data_path prefix {prefix!r} must be a path string")
    return list(prefixes), [float(w) for w in weights]


def split_weights(split: str) -> list[float]:
    """``data.split`` (``"99,1,0"``) as Megatron-Core reads it: train, valid, test weights."""
    try:
        weights = [float(w) for w in str(split).split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or weights[0] <= 0:
        raise ConfigError(
            f"data.split must be 'train,valid,test' weights with a positive train share, got {split!r}"
        )
    return weights + [0.0] * (3 - len(weights))


def channel_names(data_path: list | tuple, channels: dict) -> list[str]:
    """Name of each blend component: from ``channels`` (name -> prefix) or the prefix's basename."""
    by_prefix = {str(Path(prefix)): name for name, prefix in channels.items()}
    if not data_path:
        return ["mock"]
    names = []
    for prefix in parse_blend(data_path)[0]:
        default = Path(prefix).name.removesuffix(DOCUMENT_SUFFIX)
        names.append(by_prefix.get(str(Path(prefix)), default))
    return names


def plan_phases(
    train_iters: int,
    data_path: list,
    seq_length: int,
    global_batch_size: int,
    micro_batch_size: int,
    anneal_fraction: float = 0.0,
    anneal_data_path: list = (),
) -> list[Phase]:
    """The main phase, and the anneal phase over the last ``anneal_fraction`` of iterations."""
    base = Phase("main", 0, train_iters, tuple(data_path), seq_length, global_batch_size, micro_batch_size)
    if anneal_fraction <= 0:
        return [base]
    start = train_iters - math.ceil(anneal_fraction * train_iters)
    return [
        dataclasses.replace(base, end_iteration=start),
        dataclasses.replace(base, name="anneal", start_iteration=start, data_path=tuple(anneal_data_path)),
    ]


def phase_at(phases: list[Phase], iteration: int) -> Phase:
    """The phase that runs iteration ``iteration`` (0-based; the last phase past the end)."""
    for phase in phases:
        if iteration < phase.end_iteration:
            return phase
    return phases[-1]


def samples_before(phases: list[Phase], iteration: int) -> int:
    """Samples consumed by iterations ``0 .. iteration-1`` (Megatron's consumed_samples)."""
    total = 0
    for phase in phases:
        done = min(max(iteration - phase.start_iteration, 0), phase.iterations)
        total += done * phase.global_batch_size
    return total


def phase_sample_offset(phases: list[Phase], iteration: int) -> int:
    """Index, in the dataset of the phase running ``iteration``, of that iteration's first sample.

    A phase continues where earlier phases on the same blend stopped, counted in
    tokens: a switch from 4K to 32K sequences skips the 4K phase's tokens at the
    new length instead of starting the blend over.
    """
    current = phase_at(phases, iteration)
    earlier_tokens = sum(
        p.iterations * p.tokens_per_iteration
        for p in phases
        if p.end_iteration <= current.start_iteration and p.data_path == current.data_path
    )
    within = (iteration - current.start_iteration) * current.global_batch_size
    return earlier_tokens // current.seq_length + within


def micro_batch_sample_ids(
    first: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
):
    """Sample ids of each micro-batch this DP rank runs for one iteration.

    As Megatron-LM's ``MegatronPretrainingSampler``: the global batch is cut into
    rounds of ``micro_batch_size * dp_size`` consecutive samples, and DP rank r
    takes slice r of each round.
    """
    round_size = micro_batch_size * dp_size
    for start in range(first, first + global_batch_size, round_size):
        lo = start + dp_rank * micro_batch_size
        yield list(range(lo, lo + micro_batch_size))


def collate(samples: list[dict], sample_ids: list[int]) -> dict[str, torch.Tensor]:
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    keys += ("attention_mask",) if "attention_mask" in samples[0] else ()  # data.reset_attention_mask
    batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in keys}
    batch["dataset_id"] = torch.tensor([int(s.get("dataset_id", 0)) for s in samples], dtype=torch.long)
    batch["sample_id"] = torch.tensor(sample_ids, dtype=torch.long)
    return batch


def micro_batches(
    dataset, offset: int, phase: Phase, dp_rank: int, dp_size: int, spans: list = ()
) -> Iterator[dict]:
    """The micro-batches of one iteration for this DP rank, read from position ``offset`` on.

    ``spans`` are the phase's skipped windows (``skip_windows``): positions map to sample ids past them.
    """
    for positions in micro_batch_sample_ids(
        offset, phase.global_batch_size, phase.micro_batch_size, dp_rank, dp_size
    ):
        ids = [skip_windows.dataset_index(p, spans) for p in positions]
        yield collate([dataset[i] for i in ids], ids)


def read_micro_batches(dataset, offset: int, phase: Phase, dp_rank: int, dp_size: int, spans: list) -> list:
    return list(micro_batches(dataset, offset, phase, dp_rank, dp_size, spans))


class DatasetTokenizer:
    """What ``GPTDataset`` needs of a tokenizer: EOD id, vocab size, no pad id (masks nothing)."""

    def __init__(self, eod: int, vocab_size: int) -> None:
        self.eod = eod
        self.vocab_size = vocab_size
        self.unique_identifiers = {"class": type(self).__name__, "eod": eod, "vocab_size": vocab_size}

    @property
    def pad(self) -> int:
        raise AttributeError("no pad token: GPTDataset then uses -1, which never occurs")


def build_phase_datasets(
    phase: Phase,
    train_samples: int,
    valid_samples: int,
    split: str,
    seed: int,
    tokenizer: DatasetTokenizer,
    cache_dir: str,
    data_cfg: DataConfig,
) -> tuple:
    """``(train, valid)`` datasets of ``phase`` via Megatron-Core's ``BlendedMegatronDatasetBuilder``."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    from megatron_patches.document_order import documents_in_file_order

    blend = _checked_blend(phase.data_path)
    in_file_order = not data_cfg.shuffle_documents
    if in_file_order:  # Megatron's index cache does not know this choice: keep its indices apart
        cache_dir = str(Path(cache_dir) / "documents_in_file_order")
    config = _dataset_config(phase, blend, split, seed, tokenizer, cache_dir, data_cfg)
    cls = GPTDataset if blend else MockGPTDataset
    with documents_in_file_order(in_file_order):
        train, valid, _ = BlendedMegatronDatasetBuilder(
            cls, [train_samples, valid_samples, 0], lambda: True, config
        ).build()
    return train, valid


def _checked_blend(data_path: tuple) -> tuple[list[str], list[float] | None] | None:
    """Megatron-Core's ``blend`` (prefixes, weights or None for one prefix); None for mock data."""
    if not data_path:
        return None
    prefixes, weights = parse_blend(data_path)
    for prefix in prefixes:
        check_prefix(prefix)
    return prefixes, weights if len(prefixes) > 1 else None


def _dataset_config(
    phase: Phase,
    blend: tuple | None,
    split: str,
    seed: int,
    tokenizer: DatasetTokenizer,
    cache_dir: str,
    data_cfg: DataConfig,
) -> GPTDatasetConfig:
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=phase.seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=data_cfg.reset_position_ids,
        reset_attention_mask=data_cfg.reset_attention_mask,
        eod_mask_loss=data_cfg.eod_mask_loss,
        create_attention_mask=data_cfg.reset_attention_mask,  # otherwise attention is plain causal
    )


class PhaseData:
    """This rank's view of the run's data: datasets of the current phase, batches by iteration."""

    def __init__(
        self,
        phases: list[Phase],
        data_cfg,
        tokenizer: DatasetTokenizer,
        seed: int,
        cache_dir: str,
        eval_iters: int,
        dp_rank: int,
        dp_size: int,
        skipped: list | None = None,
    ) -> None:
        self.phases = phases
        self.skipped: list = skipped or []  # skip_windows.Window list: data.skip_samples and roll-backs
        self.data_cfg = data_cfg
        self.tokenizer = tokenizer
        self.seed = seed
        self.cache_dir = cache_dir
        self.eval_iters = eval_iters
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.phase: Phase | None = None
        self.train = self.valid = None
        self.built: dict = {}  # phase name -> its train dataset, for data_usage
        self.read_ahead = ReadAhead(data_cfg.num_workers)

    def enter(self, phase: Phase) -> None:
        """Build the datasets of ``phase`` (Megatron caches their indices in ``cache_dir``)."""
        self.train, self.valid = self._build(phase)
        self.built[phase.name] = self.train
        self.phase = phase

    def _build(self, phase: Phase) -> tuple:
        last_offset = phase_sample_offset(self.phases, phase.end_iteration - 1)
        skipped = skip_windows.skipped_count(skip_windows.of_phase(self.skipped, phase.name))
        valid_samples = self.eval_iters * phase.global_batch_size
        return build_phase_datasets(
            phase,
            last_offset + phase.global_batch_size + skipped,
            valid_samples,
            self.data_cfg.split,
            self.seed,
            self.tokenizer,
            self.cache_dir,
            self.data_cfg,
        )

    def train_datasets(self, iteration: int) -> dict:
        """Train dataset of each phase iterations ``0 .. iteration-1`` read, by phase name (data_usage).

        A phase left before this process started is built again, sized as :meth:`enter` sizes it
        (Megatron's cached indices): every rank must call this at the same point, the build is collective.
        """
        for phase in self.phases:
            if phase.start_iteration < iteration and phase.name not in self.built:
                self.built[phase.name] = self._build(phase)[0]
        return self.built

    def train_batches(self, iteration: int) -> list[dict]:
        # data.num_workers: the next iterations of this phase are read in the background meanwhile
        ahead = range(iteration + 1, min(iteration + 1 + self.data_cfg.num_workers, self.phase.end_iteration))
        return self.read_ahead.get(self._train_read(iteration), [self._train_read(i) for i in ahead])

    def _train_read(self, iteration: int) -> partial:
        offset = phase_sample_offset(self.phases, iteration)
        spans = skip_windows.of_phase(self.skipped, self.phase.name)
        return partial(read_micro_batches, self.train, offset, self.phase, self.dp_rank, self.dp_size, spans)

    def read_windows(self, first_iteration: int, end_iteration: int, margin: int) -> list:
        """The sample ids iterations ``first_iteration .. end_iteration-1`` read, as windows, per phase.

        ``margin`` more samples are added after the last one (the data just past a bad window is
        often bad too). The ids already skipped inside are part of the window: merging is harmless.
        """
        windows = []
        for phase in self.phases:
            lo, hi = max(first_iteration, phase.start_iteration), min(end_iteration, phase.end_iteration)
            if lo >= hi:
                continue
            spans = skip_windows.of_phase(self.skipped, phase.name)
            first = skip_windows.dataset_index(phase_sample_offset(self.phases, lo), spans)
            last_position = phase_sample_offset(self.phases, hi - 1) + phase.global_batch_size - 1
            windows.append([first, skip_windows.dataset_index(last_position, spans), phase.name])
        if windows:
            windows[-1][1] += margin
        return [tuple(w) for w in windows]

    def skip(self, windows: list) -> None:
        """Never read ``windows`` from now on; the next :meth:`enter` sizes the datasets for them."""
        self.skipped = skip_windows.merge(self.skipped + list(windows))

    def valid_batches(self, eval_iteration: int) -> list[dict]:
        offset = eval_iteration * self.phase.global_batch_size
        return list(micro_batches(self.valid, offset, self.phase, self.dp_rank, self.dp_size))

    def num_microbatches(self) -> int:
        return self.phase.global_batch_size // (self.phase.micro_batch_size * self.dp_size)
