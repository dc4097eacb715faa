import dataclasses

import numpy as np
import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.formats.indexed import check_prefix
from megatron_patches.training.config import DataConfig
from megatron_patches.training.data import (
    DatasetTokenizer,
    Phase,
    build_phase_datasets,
    channel_names,
    micro_batch_sample_ids,
    parse_blend,
    phase_at,
    phase_sample_offset,
    plan_phases,
    samples_before,
)
from tests.dist import run_on_ranks
from tests.megatron_patches.training.corpus import EOD, write_corpus


def test_blend_parsing_and_channel_names():
    assert parse_blend(["a/zh_text_document"]) == (["a/zh_text_document"], [1.0])
    assert parse_blend([4, "zh", 4, "en", 2, "code"]) == (["zh", "en", "code"], [4.0, 4.0, 2.0])
    path = [1, "/d/zh_web_text_document", 1, "/d/en_text_document"]
    assert channel_names(path, {}) == ["zh_web", "en"]
    assert channel_names(path, {"chinese": "/d/zh_web_text_document"}) == ["chinese", "en"]
    with pytest.raises(ConfigError, match="must be a positive number"):
        parse_blend([0, "a", 1, "b"])
    with pytest.raises(ConfigError, match=r"\[weight, prefix"):
        parse_blend([1, "a", 2])


def test_sampler_matches_megatron_pretraining_sampler():
    # Megatron-LM: rounds of micro_batch_size * dp consecutive ids, DP rank r takes slice r.
    ranks = [list(micro_batch_sample_ids(100, 8, 2, r, 2)) for r in range(2)]
    assert ranks[0] == [[100, 101], [104, 105]]
    assert ranks[1] == [[102, 103], [106, 107]]
    everything = sorted(i for rank in ranks for mb in rank for i in mb)
    assert everything == list(range(100, 108))


def test_anneal_phase_and_derived_positions():
    phases = plan_phases(100, [1, "main"], 64, 8, 2, anneal_fraction=0.1, anneal_data_path=[1, "anneal"])
    assert [(p.name, p.start_iteration, p.end_iteration, p.data_path) for p in phases] == [
        ("main", 0, 90, (1, "main")),
        ("anneal", 90, 100, (1, "anneal")),
    ]
    assert phase_at(phases, 89).name == "main" and phase_at(phases, 90).name == "anneal"
    assert samples_before(phases, 95) == 95 * 8
    assert phase_sample_offset(phases, 89) == 89 * 8
    assert phase_sample_offset(phases, 92) == 2 * 8  # the anneal blend starts at its own sample 0


def test_a_longer_sequence_phase_continues_the_same_blend_by_tokens():
    short = Phase("4k", 0, 90, (1, "p"), 4096, 64, 1)
    long = dataclasses.replace(
        short, name="32k", start_iteration=90, end_iteration=100, seq_length=32768, global_batch_size=8
    )
    phases = [short, long]
    assert long.tokens_per_iteration == short.tokens_per_iteration
    assert phase_sample_offset(phases, 90) == 90 * 64 * 4096 // 32768
    assert phase_sample_offset(phases, 91) == 90 * 64 * 4096 // 32768 + 8
    assert samples_before(phases, 91) == 90 * 64 + 8


def _build_blend(tmp: str):
    from pathlib import Path

    zh = write_corpus(Path(tmp) / "data", "zh", 60, 200, seed=1, period=3)
    en = write_corpus(Path(tmp) / "data", "en", 60, 200, seed=2, period=7)
    phase = Phase("main", 0, 10, (1, zh, 1, en), 32, 8, 2)
    train, valid = build_phase_datasets(
        phase, 80, 16, "90,10,0", 1234, DatasetTokenizer(EOD, 256), f"{tmp}/cache", DataConfig()
    )
    samples = [train[i] for i in range(80)]
    return (
        check_prefix(zh),
        {int(s["dataset_id"]) for s in samples},
        [(s["tokens"].numpy(), s["labels"].numpy()) for s in samples[:4]],
        len(valid),
    )


def test_gpt_dataset_blend_carries_dataset_id(tmp_path):
    # BlendedDataset needs a process group (it is distributed-aware): one gloo rank.
    [(documents, ids, pairs, valid_len)] = run_on_ranks(_build_blend, 1, str(tmp_path))
    assert documents == 60
    assert ids == {0, 1}
    for tokens, labels in pairs:
        assert tokens.shape == labels.shape == (32,)
        assert np.array_equal(tokens[1:], labels[:-1])
    assert valid_len >= 16


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p.parent / (p.name + ".idx")).unlink(), "does not exist"),
        (lambda p: (p.parent / (p.name + ".idx")).write_bytes(b"garbage" * 10), "not a Megatron index file"),
        (lambda p: _truncate(p.parent / (p.name + ".idx"), 40), "is truncated"),
        (lambda p: _truncate(p.parent / (p.name + ".bin"), 10), "holds"),
    ],
)
def test_corrupt_prefixes_are_named(tmp_path, damage, message):
    prefix = write_corpus(tmp_path, "code", 10, 100, seed=3)
    from pathlib import Path

    damage(Path(prefix))
    with pytest.raises(ConfigError, match=message):
        check_prefix(prefix)


def _truncate(path, keep_bytes):
    path.write_bytes(path.read_bytes()[:-keep_bytes])
