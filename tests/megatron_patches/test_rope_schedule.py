"""Staged RoPE base / sequence length: planning as pure functions, the switch in a real run."""

import dataclasses
import shutil

import pytest
import torch

from megatron_patches.errors import ConfigError
from megatron_patches.hooks import enable_patch, phase_model_config
from megatron_patches.rope_schedule import Stage, plan_stages, split_phases
from megatron_patches.training.config import load_config
from megatron_patches.training.data import phase_sample_offset, plan_phases
from tests.dist import run_on_ranks
from tests.megatron_patches.probe import tensorboard_scalars, train_with_probe
from tests.megatron_patches.training.test_train import losses, tiny_args, two_channels
from tools.convert import mcore_io


def _schedule(stages, train_iters=100, batch=64, seq=4096, keep=True):
    cfg = load_config(
        None,
        [
            f"train.train_iters={train_iters}",
            f"train.global_batch_size={batch}",
            "train.micro_batch_size=1",
            f"data.seq_length={seq}",
            f"patches.rope_schedule={{stages: {stages}, keep_tokens_per_iteration: {str(keep).lower()}}}",
        ],
    )
    return enable_patch("rope_schedule", cfg.patches["rope_schedule"], cfg)


def _spans(stages, train_iters=100, batch=64, seq=4096, keep=True):
    return _schedule(stages, train_iters, batch, seq, keep).spans


def test_ninety_percent_at_4k_then_32k_keeps_tokens_per_iteration():
    spans = _spans(
        "[{until_fraction: 0.9, seq_length: 4096, rotary_base: 10000},"
        " {seq_length: 32768, rotary_base: 1000000, micro_batch_size: 1}]"
    )
    assert [(s.start, s.end, s.seq_length, s.rotary_base, s.global_batch_size) for s in spans] == [
        (0, 90, 4096, 10000.0, 64),
        (90, 100, 32768, 1e6, 8),
    ]
    assert spans[0].global_batch_size * 4096 == spans[1].global_batch_size * 32768


def test_until_tokens_switches_at_the_first_iteration_that_reaches_it():
    stages = "[{until_tokens: 700, seq_length: 32, rotary_base: 1e4}, {seq_length: 64, rotary_base: 1e6}]"
    spans = _spans(stages, train_iters=6, batch=8, seq=32)
    assert [(s.start, s.end, s.global_batch_size) for s in spans] == [(0, 3, 8), (3, 6, 4)]  # 3*256 >= 700
    big = "[{until_tokens: 9e11, seq_length: 4096, rotary_base: 1e4}, {seq_length: 32768, rotary_base: 1e6}]"
    spans = _spans(big, train_iters=10**6, batch=256, seq=4096)  # 2^20 tokens per iteration
    assert [(s.start, s.end) for s in spans] == [(0, 858307), (858307, 10**6)]  # 858307 * 2^20 >= 9e11


def test_fractions_of_tokens_hold_when_tokens_per_iteration_change():
    # Global batch fixed at 8 sequences: stage 1 reads twice the tokens per iteration.
    stages = "[{until_fraction: 0.5, seq_length: 32, rotary_base: 1e4}, {seq_length: 64, rotary_base: 1e6}]"
    spans = _spans(stages, train_iters=6, batch=8, seq=32, keep=False)
    assert [(s.start, s.end, s.global_batch_size) for s in spans] == [(0, 4, 8), (4, 6, 8)]
    assert 4 * 8 * 32 == 2 * 8 * 64  # half the run's tokens in each stage


def test_stages_cut_the_anneal_phase_and_the_blend_continues_by_tokens():
    phases = plan_phases(100, [1, "main"], 4096, 64, 1, anneal_fraction=0.1, anneal_data_path=[1, "ann"])
    schedule = _schedule(
        "[{until_fraction: 0.95, seq_length: 4096, rotary_base: 1e4}, {seq_length: 32768, rotary_base: 1e6}]"
    )
    split = split_phases(phases, schedule.spans)
    model = load_config(None, []).model
    base = {p.name: schedule.model_config(p, model).rotary_base for p in split}
    assert [(p.name, p.start_iteration, p.end_iteration, p.seq_length, base[p.name]) for p in split] == [
        ("main/stage0", 0, 90, 4096, 1e4),
        ("anneal/stage0", 90, 95, 4096, 1e4),
        ("anneal/stage1", 95, 100, 32768, 1e6),
    ]
    # The patch's own record: the loop's phases carry no rotary base; checkpoints get it from the hooks.
    assert not hasattr(split[2], "rotary_base")
    assert phase_model_config([schedule], split[2], model).rotary_base == 1e6 != model.rotary_base
    assert phase_sample_offset(split, 95) == 5 * 64 * 4096 // 32768  # after the 4K anneal tokens


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("[]", "stages must be a non-empty list"),
        ("[{seq_length: 64}]", "stages[0] needs rotary_base"),
        ("[{seq_length: 64, rotary_base: 1e4}, {seq_length: 64, rotary_base: 1e6}]", "needs until_tokens or"),
        ("[{seq_length: 64, rotary_base: 1e4, until_tokens: 9}]", "the last stage runs to the end"),
        (
            "[{until_fraction: 1.5, seq_length: 64, rotary_base: 1}, {seq_length: 64, rotary_base: 2}]",
            "below 1",
        ),
        ("[{seq_length: 64, rotary_base: -5}]", "stages[0].rotary_base must be a number above 0, got -5"),
        (
            "[{seq_length: 64, rotary_base: 1e4, rope: 1}]",
            "unknown config key 'patches.rope_schedule.stages[0].rope'",
        ),
        (
            "[{seq_length: 64, rotary_bse: 1e4}]",
            "unknown config key 'patches.rope_schedule.stages[0].rotary_bse'; did you mean 'rotary_base'?",
        ),
        ("[{seq_length: 6.5, rotary_base: 1e4}]", "'patches.rope_schedule.stages[0].seq_length' expects int"),
        ("{seq_length: 64}", "'patches.rope_schedule.stages' expects a list of mappings"),
        (
            "[{until_fraction: 0.5, seq_length: 48, rotary_base: 1e4}, {seq_length: 64, rotary_base: 1e6}]",
            "needs a global batch of 5.33333 sequences of 48",
        ),
        (
            "[{until_fraction: 0.6, seq_length: 32, rotary_base: 1}, {until_fraction: 0.5, seq_length: 32,"
            " rotary_base: 2}, {seq_length: 32, rotary_base: 3}]",
            "stages[1] gets no iterations",
        ),
        (
            "[{until_tokens: 100000, seq_length: 32, rotary_base: 1}, {seq_length: 32, rotary_base: 2}]",
            "stages[0] gets no iterations",
        ),
    ],
)
def test_bad_schedules_are_named(stages, message):
    with pytest.raises(ConfigError) as err:
        _spans(stages, train_iters=6, batch=8, seq=32)
    assert message in str(err.value)


def test_fractions_are_read_exactly():
    first = Stage(seq_length=8, rotary_base=1, until_fraction=0.9)
    assert plan_stages([Stage(seq_length=8, rotary_base=1)], 7, [2], 1)[0].end == 7
    assert first.fraction * 100 == 90  # not 90.00000000000001, which would switch a step late


SCHEDULE = (
    "patches.rope_schedule={stages: [{until_tokens: 700, seq_length: 32, rotary_base: 10000},"
    " {seq_length: 64, rotary_base: 1000000}]}"
)


def _args(run_dir, data, *extra):
    return tiny_args(
        run_dir,
        data,
        "parallel.pipeline_model_parallel_size=2",
        "train.train_iters=6",
        "checkpoint.save_interval=2",
        "checkpoint.keep_last=10",
        "logging.log_interval=1",
        SCHEDULE,
        "patches.probe={emb_length: 32}",
        *extra,
    )


def _fresh_rotary(args: list[str], base: float, length: int) -> torch.Tensor:
    """A newly built model stage with ``base``: its rotary embedding for ``length`` positions."""
    from megatron_patches import parallel
    from megatron_patches.training.model import build_model_for_this_rank

    cfg = load_config(None, args)
    layout = parallel.Layout(2, 1, 2)
    parallel.initialize(layout, cfg.seed, cfg.model)
    model = build_model_for_this_rank(dataclasses.replace(cfg.model, rotary_base=base))
    return model.rotary_pos_emb(length, packed_seq=False, cp_group=None)


def _train_then_fresh(args: list[str]):
    code, record = train_with_probe(args)
    return code, record, _fresh_rotary(args, 1e6, 32)


def _resume_from(source, iteration, target, data):
    """A run directory whose only checkpoint is ``source``'s of ``iteration``; resume it."""
    name = mcore_io.iteration_dir_name(iteration)
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)
    mcore_io.write_tracker(target / "checkpoints", iteration)
    results = run_on_ranks(train_with_probe, 2, _args(target, data), timeout=300)
    assert [code for code, _ in results] == [0, 0]
    return [record for _, record in results]


def test_the_switch_at_700_tokens_and_resume_on_either_side(tmp_path):
    data = two_channels(tmp_path)
    full = tmp_path / "full"
    args = _args(full, data)
    results = run_on_ranks(_train_then_fresh, 2, args, timeout=300)
    assert [code for code, _, _ in results] == [0, 0]
    for _, record, fresh in results:  # both pipeline stages own a rotary embedding
        before, after = record["phases"]
        assert (before["iteration"], before["seq_length"], before["rotary_base"]) == (0, 32, 1e4)
        assert (after["iteration"], after["seq_length"], after["rotary_base"]) == (3, 64, 1e6)
        assert (before["global_batch_size"], after["global_batch_size"]) == (8, 4)
        torch.testing.assert_close(after["emb"], fresh, rtol=0, atol=0)
        assert not torch.equal(before["emb"], after["emb"])
        expected = 1.0 / 1e6 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
        torch.testing.assert_close(after["inv_freq"], expected)
        assert record["saves"] == [2, 3, 4, 6]  # 3: the end of the first stage
    shapes = results[1][1]["shapes"]  # the last stage sees the losses
    assert {i: shapes[i] for i in range(1, 7)} == {
        **{i: [(2, 32)] * 4 for i in (1, 2, 3)},
        **{i: [(2, 64)] * 2 for i in (4, 5, 6)},
    }
    assert tensorboard_scalars(full, "rope/base") == {1: 1e4, 2: 1e4, 3: 1e4, 4: 1e6, 5: 1e6, 6: 1e6}
    assert tensorboard_scalars(full, "seq_length") == {1: 32, 2: 32, 3: 32, 4: 64, 5: 64, 6: 64}
    # Each checkpoint records the base its weights were trained with (for the converters).
    from tools.convert.mcore_io import read_model_config

    bases = [read_model_config(full / "checkpoints", i).rotary_base for i in (2, 3, 4)]
    assert bases == [1e4, 1e4, 1e6]

    expected = losses(full)
    for iteration, first_phase in ((2, (2, 32, 1e4)), (3, (3, 64, 1e6)), (4, (4, 64, 1e6))):
        resumed = tmp_path / f"from{iteration}"
        records = _resume_from(full, iteration, resumed, data)
        first = records[0]["phases"][0]
        assert (first["iteration"], first["seq_length"], first["rotary_base"]) == first_phase
        torch.testing.assert_close(records[0]["phases"][-1]["emb"], results[0][2], rtol=0, atol=0)
        got = losses(resumed)
        assert [got[i] for i in range(iteration + 1, 7)] == [expected[i] for i in range(iteration + 1, 7)]
