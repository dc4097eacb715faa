"""Data usage: the plan's epochs per channel; document uses and channel tokens against brute force."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.formats.indexed import token_count
from megatron_patches.formats.usage import read_usage
from megatron_patches.training import run as trainer
from megatron_patches.training import skip_windows
from megatron_patches.training.config import load_config
from megatron_patches.training.data import DatasetTokenizer, PhaseData, channel_names, plan_phases
from tests.dist import run_on_ranks
from tests.megatron_patches.probe import tensorboard_scalars
from tests.megatron_patches.training.corpus import EOD
from tests.megatron_patches.training.test_train import _train, tiny_args, two_channels

SKIPPED = [[3, 5]]  # sample ids never read: not counted anywhere


def test_the_plan_shows_epochs_per_channel_with_the_anneal_phase_and_refuses_above_max_epochs(
    tmp_path, capsys
):
    data = two_channels(tmp_path)
    zh, en = data[1], data[3]
    anneal = ["data.anneal_fraction=0.5", f"data.anneal_data_path={json.dumps([1, en])}"]
    args = tiny_args(tmp_path / "run", data, "train.train_iters=10", "data.max_epochs=4", *anneal)
    assert trainer.main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name, prefix, consumed in (("zh", zh, 640), ("en", en, 640 + 1280)):  # 5 + 5 iterations x 256 tokens
        available = int(token_count(prefix) * 0.95)  # data.split=95,5,0
        line = f"usage {name}: {available:,} tokens available, {consumed:,} to consume"
        assert f"{line} ({consumed / available:.2f} epochs)" in out
    with pytest.raises(ConfigError) as refused:  # en: 2,560 + 5,120 tokens; zh: 2,560 (under the limit)
        trainer.main([*args, "train.train_iters=40", "data.max_epochs=1.2", "--dry-run"])
    en_epochs = 7680 / int(token_count(en) * 0.95)
    assert str(refused.value).startswith(
        f"the run would read channel(s) beyond data.max_epochs=1.2: en {en_epochs:.2f} epochs (7,680 of "
    )
    assert "zh" not in str(refused.value) and "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("usage")
    args = tiny_args(
        root / "run",
        two_channels(root),
        "train.train_iters=4",
        "checkpoint.save_interval=2",
        "logging.log_interval=1",
        f"data.skip_samples={json.dumps(SKIPPED)}",
    )
    assert run_on_ranks(_train, 1, args, timeout=300) == [0]
    return root / "run", run_on_ranks(_brute_force, 1, args, (2, 4), timeout=300)[0]


def _brute_force(args: list[str], checkpoints: tuple) -> dict[int, tuple[Counter, dict]]:
    """Walk every consumed sample with Megatron-Core's own per-sample query: channel and documents."""
    cfg = load_config(None, args)
    train = cfg.train
    phase = plan_phases(train.train_iters, cfg.data.data_path, 32, train.global_batch_size, 2)[0]
    cache = str(Path(cfg.run_dir) / "data_cache")
    windows = skip_windows.parse(SKIPPED)  # the dataset is sized for them, as in the run
    data = PhaseData([phase], cfg.data, DatasetTokenizer(EOD, 128), cfg.seed, cache, 0, 0, 1, windows)
    data.enter(phase)
    names = channel_names(cfg.data.data_path, {})
    spans = skip_windows.of_phase(windows, "main")
    channels, documents, found = Counter(), {}, {}
    for position in range(max(checkpoints) * cfg.train.global_batch_size):
        sample = skip_windows.dataset_index(position, spans)
        k, j = int(data.train.dataset_index[sample]), int(data.train.dataset_sample_index[sample])
        part = data.train.datasets[k]
        channels[names[k]] += cfg.data.seq_length
        uses = documents.setdefault(part.dataset.path_prefix, Counter())
        uses.update(int(d) for d in part._query_document_sample_shuffle_indices(j)[1])
        if (position + 1) % cfg.train.global_batch_size == 0:
            done = (position + 1) // cfg.train.global_batch_size
            found[done] = (Counter(channels), {p: Counter(c) for p, c in documents.items()})
    return {n: found[n] for n in checkpoints}


def _counts(checkpoint: Path) -> dict[str, np.ndarray]:
    return {usage.prefix: usage.counts for usage in read_usage(checkpoint).values()}


@pytest.mark.parametrize("iteration", [2, 4])
def test_usage_counts_equal_megatrons_documents_of_the_consumed_samples(run, iteration):
    run_dir, brute = run
    expected = brute[iteration][1]
    counts = _counts(run_dir / "checkpoints" / f"iter_{iteration:07d}")
    assert sorted(counts) == sorted(str(Path(p).resolve()) for p in expected)
    for prefix, uses in expected.items():
        got = counts[str(Path(prefix).resolve())]
        assert got.dtype == np.uint16
        assert {d: int(n) for d, n in enumerate(got) if n} == dict(uses)


def test_channel_tokens_total_counts_the_samples_read(run):
    run_dir, brute = run
    channels = brute[4][0]
    for name in ("zh", "en"):
        logged = tensorboard_scalars(run_dir, f"channel_tokens_total/{name}")
        assert logged[4] == channels[name], name
    assert sum(channels.values()) == 4 * 8 * 32
