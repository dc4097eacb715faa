"""Every command shown in README.md, docs/*.md and bench/README.md is run or checked, so docs cannot drift.

A fenced shell block (```bash, sh, shell or console) is either marked runnable, with the info string
``bash runnable``, and then each of its commands runs as written from the repository root (after
RUNNABLE_SUBSTITUTIONS), or each of its commands is a key of CHECKS, which says how it is exercised:

- ``Parse()``: the real CLI parses the documented arguments, in this process, without running
  (``python -m MODULE ...``, ``python SCRIPT.py ...``); a ``make`` command is expanded by ``make -n``
  first and our commands it prints are parsed. Trainer commands also load their config and overrides.
  ``Parse("...")`` parses a concrete form of a command shown with ``[optional]`` or ``a|b`` parts.
- ``Launch()``: a launch script runs as documented, with a stand-in ``python`` that records its
  arguments (and ``srun`` that runs its command); every trainer command line it made is parsed.
- ``Run("...")``: a tiny stand-in runs for real; ``{tmp}`` is a temporary directory and ``{tiny_hf}``
  a tiny Llama HF directory.
- ``RunBy("tests/...::test_name")``: an existing test runs the command.
- ``Foreign("why")``: a third-party tool's command (not ours to run here).

Comment lines and trailing ``# ...`` comments are not part of a command; ``\\`` joins lines.
A command that is neither runnable nor a key of CHECKS fails the test that names it.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
RUNNABLE = "runnable"
README_LIMIT_BYTES = 15_000
# Applied to runnable commands before they run: outputs go to a temporary directory.
RUNNABLE_SUBSTITUTIONS = {"runs/": "{tmp}/runs/"}
OUR_COMMANDS = ("tools.", "data.", "megatron_patches.", "launch/", "bench/")


@dataclass(frozen=True)
class Parse:
    concrete: str | None = None


@dataclass(frozen=True)
class Launch:
    pass


@dataclass(frozen=True)
class Run:
    command: str


@dataclass(frozen=True)
class RunBy:
    test: str


@dataclass(frozen=True)
class Foreign:
    why: str


LAUNCH_TEST = (
    "tests/launch/test_launch_scripts.py::test_pretrain_7b_refuses_to_train_on_mock_data_unless_asked"
)
SAVE_TEST = "tests/megatron_patches/test_save_trigger.py::test_touch_save_then_stop_on_two_pipeline_stages"
FLAGSHIP_TEST = "tests/launch/test_flagship_plans.py::test_flagship_config_plans_fit_80_gb_per_gpu"
CHECKS = {
    # README.md
    "make test": Parse(),
    "make demo": Parse(),
    "DATA_BLEND=/data/tokenized/blend.yaml bash launch/pretrain_7b.sh": Launch(),
    "touch runs/<run>/save": RunBy(SAVE_TEST),
    "touch runs/<run>/stop": RunBy(SAVE_TEST),
    "make convert HF=/models/Llama-2-7b-hf OUT=ckpt/ TP=4 PP=2": Run(
        "make -o install convert HF={tiny_hf} OUT={tmp}/ckpt/ TP=4 PP=2"
    ),
    "RUN_DIR=/shared/runs/llama2_7b DATA_BLEND=/data/blend.yaml sbatch --nodes=4 --gpus-per-node=8"
    " --time=24:00:00 launch/slurm_pretrain.sbatch": RunBy(
        "tests/launch/test_slurm_requeue.py::test_the_job_requeues_itself_until_the_run_has_finished"
    ),
    "make demo ARGS=--moe": Parse(),
    # docs/moe.md
    "DATA_BLEND=/data/tokenized/blend.yaml bash launch/pretrain_moe.sh CONFIG=deepseek_moe_2b": Launch(),
    "python -m tools.convert hf2mcore --hf Mixtral-8x7B-v0.1 --out ckpt --tp 2 --pp 2 --ep 4": Parse(),
    "python -m tools.convert hf2mcore --hf DeepSeek-V2-Lite --out ckpt --tp 2 --ep 4 --etp 1": Parse(),
    "python -m tools.convert hf2mcore --hf Qwen3-30B-A3B --out ckpt --tp 2 --ep 4 --spec te"
    " --moe-grouped-gemm": Parse(),
    # docs/training.md
    "python -m megatron_patches.training --config launch/configs/tiny.yaml"
    " [key=value ...] [--dry-run]": Parse(
        "python -m megatron_patches.training --config launch/configs/tiny.yaml train.train_iters=10 lr=3e-4"
        " --dry-run"
    ),
    "bash launch/pretrain_tiny.sh": Launch(),
    "WORLD_SIZE=64 python -m megatron_patches.training --config launch/configs/llama2_70b.yaml --dry-run"
    " data.mock=true": RunBy(FLAGSHIP_TEST),
    "WORLD_SIZE=8 python -m megatron_patches.training --config launch/configs/llama2_7b_long_context.yaml"
    " --dry-run data.mock=true": RunBy(FLAGSHIP_TEST),
    # docs/gpu_cluster.md
    "MAX_RESTARTS=3 DATA_BLEND=/data/tokenized/blend.yaml bash launch/pretrain_7b.sh": Launch(),
    # docs/data.md
    "python -m data.preprocess run --config data/demo/config.yaml --out runs/demo/data": RunBy(
        "tests/data/preprocess/test_cli.py::test_demo_run_end_to_end_and_resume"
    ),
    "python -m data.preprocess run --config data/demo/config.yaml --out runs/demo/spark --engine spark"
    " --spark-master 'local[2]'": Parse(),
    "python -m data.preprocess clean --input 'raw/*.jsonl.gz' --out work/clean [--config c.yaml]": Parse(
        "python -m data.preprocess clean --input 'raw/*.jsonl.gz' --out work/clean --config c.yaml"
    ),
    "python -m data.preprocess label --input 'work/clean/part-*' --out work/label": Parse(),
    "python -m data.preprocess dedup --input 'work/label/part-*' --out work/dedup"
    " [--engine spark --spark-master local[8]]": Parse(
        "python -m data.preprocess dedup --input 'work/label/part-*' --out work/dedup"
        " --engine spark --spark-master local[8]"
    ),
    "python -m data.preprocess train-tokenizer --input 'work/dedup/part-*' --out work/tokenizer"
    " --vocab-size 64000": Parse(),
    "python -m data.preprocess tokenize --input 'work/dedup/part-*' --tokenizer work/tokenizer"
    " --out work/tokenized": Parse(),
    "python -m data.preprocess dedup-plan --config data/demo/config.yaml --out runs/plan"
    " --thresholds 0.6,0.7,0.8,0.9 [--tokenizer DIR]": Parse(
        "python -m data.preprocess dedup-plan --config data/demo/config.yaml --out runs/plan"
        " --thresholds 0.6,0.7,0.8,0.9 --tokenizer DIR"
    ),
    "python -m data.preprocess train-scorer --positive 'good/*.jsonl' --negative 'bad/*.jsonl'"
    " --out work/scorer [--config c.yaml]": Parse(
        "python -m data.preprocess train-scorer --positive 'good/*.jsonl' --negative 'bad/*.jsonl'"
        " --out work/scorer --config c.yaml"
    ),
    "python -m data.preprocess drop-used --tokenized runs/demo/data/tokenized --usage"
    " runs/demo/train/checkpoints/iter_0000400/usage --max-uses 2"
    " --out runs/demo/data/tokenized_fresh": Parse(),
    "python -m data.preprocess merge-tokenized --inputs work/tokenized-0 work/tokenized-1"
    " --out work/tokenized [--config c.yaml]": Parse(
        "python -m data.preprocess merge-tokenized --inputs work/tokenized-0 work/tokenized-1"
        " --out work/tokenized --config c.yaml"
    ),
    # docs/convert.md
    "python -m tools.convert hf2mcore --hf Llama-2-7b-hf --out ckpt --tp 4 --pp 2 [--format torch|torch_dist]"
    " [--dtype bf16]": Parse(
        "python -m tools.convert hf2mcore --hf Llama-2-7b-hf --out ckpt --tp 4 --pp 2 --format torch_dist"
        " --dtype bf16"
    ),
    "python -m tools.convert mcore2hf --mcore runs/x/checkpoints --out hf-out [--iteration 2000]"
    " [--hf-config DIR] [--tokenizer DIR]": Parse(
        "python -m tools.convert mcore2hf --mcore runs/x/checkpoints --out hf-out --iteration 2000"
        " --hf-config DIR --tokenizer DIR"
    ),
    "python -m tools.convert mcore2mcore --mcore ckpt --out ckpt-tp2pp4 --tp 2 --pp 4": Parse(),
    "python -m tools.convert hf2mcore --hf Llama-2-7b-hf --out ckpt --tp 1 --pp 2 --vpp 2": Parse(),
    "python -m tools.convert hf2hf --hf Qwen2.5-7B --out qwen-as-llama --to llama": Parse(),
    "make convert HF=/models/Llama-2-7b-hf OUT=ckpt TP=4 PP=2": Parse(),
    "make convert DIRECTION=mcore2hf MCORE=ckpt OUT=hf-out": Parse(),
    'make convert HF=... OUT=... TP=8 ARGS="--format torch_dist --dtype bf16 --force"': Parse(),
    # docs/eval_infer.md
    "python -m tools.eval ppl --hf DIR --data held_out/": Parse(),
    "python -m tools.eval ppl --checkpoints runs/7b --data held_out/ [--convert]": Parse(
        "python -m tools.eval ppl --checkpoints runs/7b --data held_out/ --convert"
    ),
    "python -m tools.eval probes --hf DIR --probes probes.yaml": Parse(),
    "python -m tools.eval bench --hf DIR --data mmlu.jsonl --rewrite zh-labels --shots 5": Parse(),
    'python -m tools.eval inspect --hf DIR --text "中国的首都是"'
    " --attention 3 0 -1 0 --plot lens.png": Parse(),
    "pip install lm-eval": Foreign("installs lm-evaluation-harness from PyPI"),
    "lm_eval --model hf --model_args pretrained=DIR,dtype=bfloat16 --tasks mmlu,cmmlu,ceval-valid,gsm8k"
    " --num_fewshot 5 --batch_size auto --output_path results/": Foreign("lm-evaluation-harness's CLI"),
    "python -m tools.infer --model DIR --data prompts.jsonl --out out.jsonl --replicas 4"
    " --devices 0,1,2,3,4,5,6,7 [--max-new-tokens 256 --temperature 0.7 --batch-size 8]": Parse(
        "python -m tools.infer --model DIR --data prompts.jsonl --out out.jsonl --replicas 4"
        " --devices 0,1,2,3,4,5,6,7 --max-new-tokens 256 --temperature 0.7 --batch-size 8"
    ),
    'python -m tools.infer --model DIR --prompt "中国的首都是"': Parse(),
    # docs/scaling.md
    "python -m tools.scaling plan --config BASE.yaml --out OUT --widths 64,96,128 --tokens 2e5,4e5,8e5"
    " [--lrs 1e-3,3e-3] [--batches 16,32] [--set section.key=value]": Parse(
        "python -m tools.scaling plan --config BASE.yaml --out OUT --widths 64,96,128 --tokens 2e5,4e5,8e5"
        " --lrs 1e-3,3e-3 --batches 16,32 --set section.key=value"
    ),
    "python -m tools.scaling plan --config BASE.yaml --out OUT --widths 64,96,128 --flops 1e12,4e12": Parse(),
    "python -m tools.scaling run --out OUT [--nproc 2] [--index I] [--launcher CMD]": Parse(
        "python -m tools.scaling run --out OUT --nproc 2 --index 3 --launcher CMD"
    ),
    "python -m tools.scaling run --out OUT --slurm --sbatch-line=--partition=gpu": Parse(),
    "python -m tools.scaling fit --out OUT [--loss val|train] [--bootstrap 200]"
    " [--bench ACC.yaml --chance 0.25]": Parse(
        "python -m tools.scaling fit --out OUT --loss train --bootstrap 200 --bench ACC.yaml --chance 0.25"
    ),
    "python -m tools.scaling predict --out OUT --flops 1e21": Parse(),
    "make scaling-demo": Parse(),
    # bench/README.md
    "python bench/patches_overhead.py --preset tiny-long --iters 300 --reps 3": Parse(),
    "python bench/train_throughput.py --preset tiny-long": Parse(),
    "python bench/train_throughput.py --preset tiny-moe --backends sdpa": Parse(),
    "python bench/moe_load_overhead.py": Parse(),
    "python bench/preprocess.py --mb 200": Parse(),
    "python bench/preprocess.py --mb 40 --only clean --only tokenize --repeat 5": Parse(),
    "python bench/preprocess.py --mb 200 --only clean": Parse(),
    "python bench/convert.py": Parse(),
    "python bench/convert.py --layers 2 --cold": Parse(),
    "bash bench/gpu_check.sh [RESULT_DIR]": RunBy(
        "tests/bench/test_gpu_check.py::test_gpu_check_runs_every_step_after_a_failure_and_reports_it"
    ),
    "pip download megatron-core==0.16.1 --python-version 3.12 --only-binary :all: --no-deps -d .whl": Foreign(
        "pip fetching the wheel bench/gpu_check.sh carries to an offline GPU machine (needs PyPI)"
    ),
}


@dataclass(frozen=True)
class Command:
    text: str
    where: str
    runnable: bool


def shell_commands(path: Path) -> list[Command]:
    """The commands of every fenced shell block in ``path``, comments dropped, continuations joined."""
    commands, block, pending = [], None, ""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("```"):
            info = line[3:].split()
            block = None if block is not None else (info if info else [""])
            continue
        if block is None or block[0] not in SHELL_LANGUAGES or line.lstrip().startswith("#"):
            continue
        line = re.sub(r"\s+#(\s.*)?$", "", line)
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = " ".join((pending + line).split())
        pending = ""
        if text:
            where = f"{path.relative_to(REPO)}:{number}"
            commands.append(Command(text, where, runnable=RUNNABLE in block[1:]))
    return commands


def documented_commands() -> list[Command]:
    """One entry per distinct command (checked once), naming every place that shows it."""
    places: dict[str, list[Command]] = {}
    for command in (command for path in DOCS for command in shell_commands(path)):
        places.setdefault(command.text, []).append(command)
    return [
        Command(text, ", ".join(c.where for c in shown), runnable=any(c.runnable for c in shown))
        for text, shown in places.items()
    ]


class _Parsed(BaseException):
    """Raised by the patched ``parse_args`` so a CLI stops right after parsing (no ``except Exception``)."""

    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


def parse_only(argv: list[str]) -> argparse.Namespace:
    """Run ``python``'s argv (``-m MODULE ...`` or ``SCRIPT ...``) up to its argument parsing only."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise _Parsed(original(parser, args, namespace))

    target, args = (argv[1], argv[2:]) if argv[0] == "-m" else (argv[0], argv[1:])
    # As `python SCRIPT` does, a script's own directory comes first on the path (bench scripts share code).
    path = sys.path if argv[0] == "-m" else [str((REPO / target).parent), *sys.path]
    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop),
        mock.patch.object(sys, "argv", [target, *args]),
        mock.patch.object(sys, "path", path),
    ):
        try:
            if argv[0] == "-m":
                runpy.run_module(target, run_name="__main__", alter_sys=False)
            else:
                runpy.run_path(str(REPO / target), run_name="__main__")
        except _Parsed as parsed:
            if target == "megatron_patches.training":
                check_trainer_config(parsed.namespace)
            return parsed.namespace
        except SystemExit as exit_:
            pytest.fail(f"{target} {shlex.join(args)}: arguments refused (exit {exit_.code})")
    pytest.fail(f"{target} never parsed its arguments")


def check_trainer_config(namespace: argparse.Namespace) -> None:
    """Trainer commands name a config file and override keys that exist (files they name may not)."""
    from megatron_patches.training.config import load_config

    load_config(REPO / namespace.config, namespace.overrides)


def parse_python_command(command: str) -> None:
    words = shlex.split(command)
    assert Path(words[0]).name.startswith("python"), command
    parse_only(words[1:])


def parse_make_command(command: str) -> None:
    """``make -n`` prints what the target runs (``install`` assumed done); our commands in it are parsed."""
    words = shlex.split(command)
    dry = subprocess.run(
        ["make", "-n", "-o", "install", *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    printed = [shlex.split(line) for line in dry.stdout.splitlines() if "python" in line.split(" ")[0]]
    assert printed, f"{command}: `make -n` printed no python command:\n{dry.stdout}"
    for argv in printed:
        if any(word.startswith(OUR_COMMANDS) for word in argv[1:3]):
            parse_only(argv[1:])


def run_launcher(command: str, tmp: Path) -> None:
    """Run a launch script as documented, with a recording ``python``; parse the trainer calls it made."""
    bin_dir, calls = tmp / "bin", tmp / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    stubs = {
        "python": f'#!/bin/sh\nn=$(ls {calls} | wc -l)\nprintf "%s\\0" "$@" > {calls}/$n\n',
        "srun": '#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n',  # drops its options
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    scrubbed = ("CUDA_VISIBLE_DEVICES", "SLURM_", "DATA_BLEND", "MOCK", "TP", "PP", "RUN_DIR", "LOAD")
    env = {k: v for k, v in os.environ.items() if not k.startswith(scrubbed)}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON=str(bin_dir / "python"))
    done = subprocess.run(
        ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    trainer_calls = [
        argv[argv.index("megatron_patches.training") - 1 :]
        for argv in (path.read_text().rstrip("\0").split("\0") for path in sorted(calls.iterdir()))
        if "megatron_patches.training" in argv
    ]
    assert len(trainer_calls) == 2, trainer_calls  # the dry run, then torchrun's
    for argv in trainer_calls:
        parse_only(argv)


def run_shell(command: str, tmp: Path, tiny_hf: Callable[[], Path]) -> None:
    if "{tiny_hf}" in command:
        command = command.replace("{tiny_hf}", str(tiny_hf()))
    command = command.replace("{tmp}", str(tmp))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def assert_test_exists(node: str) -> None:
    path, name = node.split("::")
    assert re.search(rf"^def {re.escape(name)}\(", (REPO / path).read_text(), re.M), f"{node} does not exist"


def check(command: Command, tmp: Path, tiny_hf: Callable[[], Path]) -> None:
    how = CHECKS[command.text]
    if isinstance(how, Parse):
        text = how.concrete or command.text
        parse_make_command(text) if text.startswith("make ") else parse_python_command(text)
    elif isinstance(how, Launch):
        run_launcher(command.text, tmp)
    elif isinstance(how, Run):
        run_shell(how.command, tmp, tiny_hf)
    elif isinstance(how, RunBy):
        assert_test_exists(how.test)
    else:
        assert isinstance(how, Foreign) and how.why


@pytest.fixture
def tiny_hf(tmp_path):
    """A tiny Llama whose 4 query groups split over TP=4 (built only when a check needs it)."""

    def build() -> Path:
        from tests.tiny_hf import build_model

        return build_model(tmp_path / "tiny_hf", num_key_value_heads=4)

    return build


COMMANDS = documented_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {c.text[:50]}" for c in COMMANDS])
def test_every_documented_command_runs_or_is_checked(command, tmp_path, tiny_hf):
    if command.runnable:
        text = command.text
        for old, new in RUNNABLE_SUBSTITUTIONS.items():
            text = text.replace(old, new)
        run_shell(text, tmp_path, tiny_hf)
        return
    assert command.text in CHECKS, (
        f"{command.where}: `{command.text}` is neither in a ```bash runnable block nor in "
        "tests/test_docs_commands.py's CHECKS; mark it runnable or say there how it is checked"
    )
    check(command, tmp_path, tiny_hf)


def test_no_check_outlives_its_command():
    shown = {command.text for command in COMMANDS}
    assert sorted(set(CHECKS) - shown) == []


def test_the_readme_is_a_short_manual_with_contents():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= README_LIMIT_BYTES
    assert "## Contents" in readme
    for room in ("data", "training", "patches", "convert", "eval_infer", "scaling", "gpu_cluster"):
        assert f"docs/{room}.md" in readme
        assert (REPO / "docs" / f"{room}.md").is_file()


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file: lower case, punctuation dropped, - for space."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_relative_links_in_the_docs_point_at_files_and_headings_that_exist():
    for path in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", path.read_text()):
            linked = path.parent / target if target else path
            assert linked.exists(), f"{path.relative_to(REPO)}: link to missing {target}"
            if anchor:
                assert anchor in heading_anchors(linked), (
                    f"{path.relative_to(REPO)}: no heading #{anchor} in {linked}"
                )


def test_a_command_missing_from_the_table_is_named(tmp_path, tiny_hf):
    page = tmp_path / "page.md"
    page.write_text("```bash\npython -m tools.convert hf2mcore --hf A \\\n  --out B   # new flag\n```\n")
    (new,) = [Command(c.text, c.where, c.runnable) for c in _commands_of(page)]
    assert new.text == "python -m tools.convert hf2mcore --hf A --out B"
    with pytest.raises(AssertionError, match="neither in a ```bash runnable block nor in"):
        test_every_documented_command_runs_or_is_checked(new, tmp_path, tiny_hf)


def test_a_flag_the_cli_does_not_have_fails_the_parse():
    with pytest.raises(pytest.fail.Exception, match="arguments refused"):
        parse_python_command("python -m tools.convert hf2mcore --hf A --out B --no-such-flag")


def _commands_of(page: Path) -> list[Command]:
    with mock.patch(f"{__name__}.REPO", page.parent):
        return shell_commands(page)
