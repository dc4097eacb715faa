"""The multi-rank harness: ranks forked from its preloaded server see what a test set up before them,
as spawned ranks did (the environment, the working directory, stdout and stderr under ``capfd``)."""

import os
import sys
from pathlib import Path

from tests.dist import run_on_ranks


def _report(variable: str) -> tuple[str | None, str]:
    rank = os.environ["RANK"]
    print(f"rank {rank} to stdout", flush=True)
    print(f"rank {rank} to stderr", file=sys.stderr, flush=True)
    return os.environ.get(variable), os.getcwd()


def test_ranks_get_the_tests_environment_working_directory_and_captured_output(tmp_path, monkeypatch, capfd):
    run_on_ranks(_report, 1, "UNSET")  # the server runs before this test's changes
    monkeypatch.setenv("RANK_HARNESS_PROBE", "set by the test")
    monkeypatch.delenv("ALLOW_CPU_TRAINING")
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    assert run_on_ranks(_report, 2, "RANK_HARNESS_PROBE") == [("set by the test", str(tmp_path))] * 2
    assert run_on_ranks(_report, 1, "ALLOW_CPU_TRAINING") == [(None, str(Path.cwd()))]
    printed = capfd.readouterr()
    assert printed.out.count("rank 0 to stdout") == 2 and "rank 1 to stdout" in printed.out
    assert printed.err.count("rank 0 to stderr") == 2 and "rank 1 to stderr" in printed.err
