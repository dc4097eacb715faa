"""Rank 0's flags ride in the loss all-reduce's token count: exact, and refused where they would not fit."""

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.hooks import Hook
from megatron_patches.training.step import (
    FLAG_SHIFT,
    MAX_FLAGS,
    check_flag_room,
    exit_signal_bits,
    pack_flags,
    rank0_flag_names,
    split_flag_bits,
    unpack_flags,
)


def test_flag_bits_survive_the_sum_over_ranks_with_the_token_counts_exact():
    # 64 ranks' token counts (x TP copies) near the limit, rank 0's MAX_FLAGS bits on top: a float64 sum.
    tokens = [(1 << FLAG_SHIFT) // 64 - 1 - rank for rank in range(64)]
    bits = (1 << MAX_FLAGS) - 1 - 0b100  # every flag but the third
    total = sum(pack_flags(float(t), bits if rank == 0 else 0) for rank, t in enumerate(tokens))
    assert unpack_flags(total) == (sum(tokens), bits)
    assert unpack_flags(pack_flags(2048.0, 0)) == (2048, 0)


def test_flags_that_would_not_fit_are_refused_before_training():
    check_flag_room(tokens_per_iteration=16 * 2**20, tensor_parallel=8, num_flags=3)
    too_many = MAX_FLAGS + 1
    with pytest.raises(
        ConfigError, match=f"{too_many} rank-0 flags requested by the patches need {too_many} bits"
    ):
        check_flag_room(4096, 1, too_many)
    with pytest.raises(ConfigError, match=rf"tokens per iteration x TP 8 reach 2\*\*{FLAG_SHIFT}"):
        check_flag_room(1 << 37, 8, 1)


def test_any_ranks_exit_signals_are_counted_beside_rank0s_flags_and_exact_tokens():
    # 16383 ranks (the most that fit beside 3 flags), a few of them signalled: every rank reads
    # rank 0's flags, the number of signalled ranks and the token total back from one float64 sum.
    world, num_flags, flags = 16383, 3, 0b101
    check_flag_room(tokens_per_iteration=16 * 2**20, tensor_parallel=8, num_flags=num_flags, world_size=world)
    signalled = {1, 77, world - 1}
    tokens = [(1 << FLAG_SHIFT) // world - 1 - (rank % 7) for rank in range(world)]
    total = sum(
        pack_flags(float(t), (flags if rank == 0 else 0) + exit_signal_bits(rank in signalled, num_flags))
        for rank, t in enumerate(tokens)
    )
    token_total, bits = unpack_flags(total)
    assert token_total == sum(tokens)
    assert split_flag_bits(bits, num_flags) == (flags, 3)
    with pytest.raises(
        ConfigError, match="3 rank-0 flags requested by the patches and a count of up to 16384"
    ):
        check_flag_room(4096, 1, num_flags, world_size=world + 1)


def test_flag_names_are_the_loops_then_each_hooks_in_order():
    class Two(Hook):
        name = "two"
        flag_names = ("a", "b")

    assert rank0_flag_names([Hook(), Two()]) == ["loop.wall_clock_save", "two.a", "two.b"]
