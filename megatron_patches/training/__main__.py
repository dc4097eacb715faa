from megatron_patches import cpu

cpu.quiet_expected_warnings()  # before Megatron-Core is imported

from megatron_patches.errors import run_cli  # noqa: E402
from megatron_patches.training.run import main  # noqa: E402

if __name__ == "__main__":  # required: dist_checkpointing's writer spawns processes that re-import __main__
    run_cli(main, "megatron_patches.training")
