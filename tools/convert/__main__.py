"""``python -m tools.convert hf2mcore|mcore2hf|mcore2mcore|hf2hf ...``: HF <-> Megatron-Core weights.

Examples::

    python -m tools.convert hf2mcore --hf Llama-2-7b-hf --out ckpt --tp 4 --pp 2
    python -m tools.convert mcore2hf --mcore runs/x/checkpoints --out hf-out [--iteration 2000]
    python -m tools.convert mcore2mcore --mcore ckpt --out ckpt-tp2pp4 --tp 2 --pp 4
    python -m tools.convert hf2hf --hf Qwen2.5-7B --out qwen-as-llama --to llama
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_patches import cpu

cpu.quiet_expected_warnings()  # before Megatron-Core is imported

from megatron_patches.errors import ConfigError, run_cli  # noqa: E402

PROG = "python -m tools.convert"


def _size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _iteration(text: str) -> int | str:
    return text if text == "release" else int(text)


def _layout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output checkpoint root (must not exist unless --force)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument(
        "--vpp", type=int, help="virtual pipeline stages per PP rank (interleaved 1F1B): model0, model1, ..."
    )
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE)")
    parser.add_argument("--etp", type=int, help="expert tensor parallel size: 1 or TP (default: TP)")
    parser.add_argument("--format", dest="fmt", default="torch", help="torch (per-rank files) or torch_dist")
    parser.add_argument(
        "--spec", default="local", help="layer-spec key names: local or te (Transformer Engine)"
    )
    parser.add_argument(
        "--moe-grouped-gemm",
        action="store_true",
        help="with --spec te: routed experts in TEGroupedMLP's layout (linear_fc1.weight<i>)",
    )
    parser.add_argument("--dtype", help="bf16, fp16 or fp32 (default: as stored)")
    parser.add_argument(
        "--decoder-first-pipeline-num-layers", dest="first", type=int, help="uneven PP: first stage"
    )
    parser.add_argument(
        "--decoder-last-pipeline-num-layers", dest="last", type=int, help="uneven PP: last stage"
    )


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (the summary line stays)")


def _mcore_arg(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--mcore", required=True, help="checkpoint root (with the tracker file) or one iteration dir"
    )
    parser.add_argument("--iteration", type=_iteration, help=f"iteration to {verb} (default: the tracker's)")
    parser.add_argument(
        "--model-config",
        help="architecture of a checkpoint recording none: YAML of model fields or Megatron-LM arguments",
    )


def _hf_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument("--dtype", help="bf16, fp16 or fp32 (default: as stored)")
    parser.add_argument("--max-shard-size", type=_size, default=5 << 30, help="e.g. 5GB (default)")


def _add_hf2mcore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hf2mcore", help="HF directory -> Megatron-Core release checkpoint")
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    _layout_args(p)


def _add_mcore2hf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mcore2hf", help="Megatron-Core checkpoint (torch or torch_dist) -> HF directory")
    _mcore_arg(p, "export")
    p.add_argument(
        "--hf-config", help="directory whose config.json (and generation_config.json) is the template"
    )
    p.add_argument("--tokenizer", help="HF tokenizer directory to ship with the export")
    p.add_argument("--family", help="export as this family (llama, mistral, qwen2, qwen3, baichuan2)")
    _hf_output_args(p)


def _add_mcore2mcore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mcore2mcore", help="re-shard a Megatron-Core checkpoint to another TP/PP")
    _mcore_arg(p, "read")
    _layout_args(p)


def _add_hf2hf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hf2hf", help="save one family's HF checkpoint as another family")
    p.add_argument("--hf", required=True, help="source HF directory")
    p.add_argument("--to", required=True, help="target family: llama, qwen2, ...")
    _hf_output_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_hf2mcore, _add_mcore2hf, _add_mcore2mcore, _add_hf2hf):
        add(sub)
    for command in sub.choices.values():
        _common_args(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    # Conversion is host-memory work; keep CUDA out of it even on a GPU node.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from tools.convert import commands

    command = args.pop("command")
    if "max_shard_size" in args:
        args["max_shard_bytes"] = args.pop("max_shard_size")
    for key in ("hf_config", "tokenizer", "mcore", "hf"):
        if args.get(key) is not None and not os.path.isdir(args[key]):
            raise ConfigError(f"--{key.replace('_', '-')} directory not found: {args[key]}")
    print(getattr(commands, command)(**args), file=sys.stdout)
    return 0


if __name__ == "__main__":
    from tools.convert.allocator import reuse_freed_memory

    reuse_freed_memory()  # process-wide, so the CLI's process only
    run_cli(main, PROG)
