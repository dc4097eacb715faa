from megatron_patches.errors import run_cli
from megatron_patches.training.run import main

if __name__ == "__main__":  # required: dist_checkpointing's writer spawns processes that re-import __main__
    run_cli(main, "megatron_patches.training")
