"""Rank 0's flags and the count of signalled ranks reach every rank through one explicit all-reduce."""

import pytest
import torch

from megatron_patches.hooks import Hook
from megatron_patches.training.agreement import (
    Agreed,
    RankAgreement,
    flag_vector,
    rank0_flag_names,
    read_vector,
)
from tests.dist import run_on_ranks


class Two(Hook):
    name = "two"
    flag_names = ("a", "b")


def test_flag_names_are_the_loops_then_each_hooks_in_order():
    assert rank0_flag_names([Hook(), Two()]) == ["loop.wall_clock_save", "two.a", "two.b"]


def _exchange() -> Agreed:
    rank = torch.distributed.get_rank()

    def rank0_answers() -> set[str]:
        if rank != 0:
            raise AssertionError("only rank 0 is asked")
        return {"two.b"}

    return RankAgreement([Two()], torch.device("cpu")).exchange(rank0_answers, signalled=rank == 2)


def test_every_rank_gets_rank0s_flags_and_the_number_of_signalled_ranks():
    expected = Agreed({"loop.wall_clock_save": False, "two.a": False, "two.b": True}, exit_signals=1)
    assert run_on_ranks(_exchange, 3, timeout=120) == [expected] * 3


def test_no_limit_on_flags_or_ranks():
    # 60 flags (the bit-packed token count held 17 with the signal count) and 20,000 ranks, 3 signalled.
    names = [f"p.f{j}" for j in range(60)]
    answers = {name for j, name in enumerate(names) if j % 3 == 0}
    vectors = [
        flag_vector(names, answers if rank == 0 else set(), rank in (1, 500, 19_999))
        for rank in range(20_000)
    ]
    agreed = read_vector(names, [sum(column) for column in zip(*vectors, strict=True)])
    assert {name for name, held in agreed.flags.items() if held} == answers
    assert agreed.exit_signals == 3


def test_an_answer_outside_the_hooks_flag_names_is_a_bug_caught_on_rank0():
    with pytest.raises(RuntimeError, match=r"rank0_flags answered \['two.c'\], not in the hooks' flag_names"):
        flag_vector(rank0_flag_names([Two()]), {"two.c"}, signalled=False)
