"""Entry point for `spark-submit` (which runs a file, not `-m`): the same CLI as `python -m data.preprocess`.

spark-submit --master yarn data/preprocess/spark_submit.py dedup --engine spark --input ... --out ...
"""

from data.preprocess.cli import PROG, main
from megatron_patches.errors import run_cli

if __name__ == "__main__":
    run_cli(main, PROG)
