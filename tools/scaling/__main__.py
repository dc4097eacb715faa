from megatron_patches.errors import run_cli
from tools.scaling.cli import PROG, main

if __name__ == "__main__":
    run_cli(main, PROG)
