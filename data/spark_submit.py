"""Entry point for `spark-submit` (which runs a file, not `-m`): the same CLI as `python -m data.preprocess`.

    spark-submit --master yarn data/spark_submit.py dedup --engine spark --input ... --out /shared/...

It lives outside `data/preprocess/` because the directory of the script goes first on `sys.path`,
where `data/preprocess/tokenize.py` would shadow the standard library's `tokenize`.
"""

from data.preprocess.cli import PROG, main
from megatron_patches.errors import run_cli

if __name__ == "__main__":
    run_cli(main, PROG)
