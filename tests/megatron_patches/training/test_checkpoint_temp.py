"""A save's temporary directory: one for all ranks, named by rank 0, dead saves' leftovers removed first."""

from __future__ import annotations

from pathlib import Path

from megatron_patches import paths
from tests.dist import run_on_ranks


def _temp_dir_of_this_rank(root: str) -> str:
    from megatron_patches.training import checkpoint

    return str(checkpoint._temp_dir_from_rank0(Path(root), Path(root) / "iter_0000020"))


def test_every_rank_writes_into_the_one_hidden_directory_rank_0_made(tmp_path):
    killed = tmp_path / f".iter_0000010.partial-{paths.owner_tag(2**40)}-0123abcd"  # no such pid can exist
    killed.mkdir()
    (killed / "__0_0.distcp").write_bytes(b"x" * 10)
    temps = run_on_ranks(_temp_dir_of_this_rank, 2, str(tmp_path), timeout=300)
    assert len(set(temps)) == 1 and Path(temps[0]).is_dir()
    assert paths.temp_dir_target(temps[0]) == tmp_path / "iter_0000020"
    assert [p.name for p in tmp_path.iterdir()] == [Path(temps[0]).name]  # the killed save's is gone
