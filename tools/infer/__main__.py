"""``python -m tools.infer``: batch inference with N replicas, or one prompt streamed.

    python -m tools.infer --model DIR --data in.jsonl --out out.jsonl --replicas 4 --devices 0,1,2,3,4,5,6,7
    python -m tools.infer --model DIR --prompt "中国的首都是"

Every input id appears in the output exactly once, in input order; rerunning
the same command after a kill resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from megatron_patches.errors import ConfigError, run_cli
from tools.hf_runtime.generation import Sampling, check_sampling, stream
from tools.hf_runtime.loading import DTYPES, load_model, load_tokenizer, model_type
from tools.infer.records import OrderedWriter, read_inputs, recover_output
from tools.infer.replicas import ReplicaSpec, device_groups, parse_devices, run_replicas

PROG = "python -m tools.infer"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--tokenizer", help="HF tokenizer directory (default: the model directory)")
    parser.add_argument("--data", type=Path, help="input JSONL: {id, prompt} a line")
    parser.add_argument("--out", type=Path, help="output JSONL (appended to; resumes)")
    parser.add_argument("--prompt", help="generate for this one prompt, streaming to stdout")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--devices", help="GPU indices split among replicas, or 'cpu' (default: all GPUs)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts a replica generates together")
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--stop", help="end each generation at this string (e.g. a newline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run modeling code shipped with the model (Baichuan2); only for models you trust",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.stop, args.seed)
    check_sampling(sampling)
    model_type(args.model, args.trust_remote_code)  # a loadable HF directory, before any replica starts
    devices = parse_devices(args.devices)
    dtype = args.dtype or ("float32" if devices == ["cpu"] else "bfloat16")
    if args.prompt is not None:
        return stream_one(args, devices[0], dtype, sampling)
    return run_batch(args, devices, dtype, sampling)


def stream_one(args: argparse.Namespace, device: str, dtype: str, sampling: Sampling) -> int:
    """``--prompt``: one generation, streamed to stdout, on ``device`` (``cpu`` or a GPU index)."""
    device = "cpu" if device == "cpu" else f"cuda:{device}"
    model = load_model(args.model, dtype, device, trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(args.tokenizer or args.model, args.trust_remote_code)
    stream(model, tokenizer, args.prompt, sampling)
    return 0


def run_batch(args: argparse.Namespace, devices: list[str], dtype: str, sampling: Sampling) -> int:
    """``--data``/``--out``: every pending prompt through the replicas, resuming a previous run."""
    if not (args.data and args.out):
        raise ConfigError("batch inference needs --data and --out (or --prompt for one prompt)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    groups = device_groups(devices, args.replicas)
    tokenizer_dir = args.tokenizer or args.model
    load_tokenizer(tokenizer_dir, args.trust_remote_code)  # fails here, not in every replica
    pending = pending_records(args.data, args.out, args.prompt_key)
    if not pending:
        return 0
    threads = max(1, (os.cpu_count() or 1) // len(groups)) if devices == ["cpu"] else 4
    spec = ReplicaSpec(
        args.model,
        tokenizer_dir,
        dtype,
        sampling,
        args.batch_size,
        args.prompt_key,
        threads,
        args.trust_remote_code,
    )
    writer = OrderedWriter(args.out, [json.dumps(r["id"]) for _, r in pending])
    try:
        run_replicas(spec, groups, pending, writer)
    finally:
        writer.close()
    return 0


def pending_records(data: Path, out: Path, prompt_key: str) -> list[tuple[int, dict]]:
    """(position in ``data``, record) of every input whose id is not yet in ``out``."""
    records = read_inputs(data, prompt_key)
    done = recover_output(out)
    unknown = done - {json.dumps(r["id"]) for r in records}
    if unknown:
        raise ConfigError(f"{out} holds ids not in {data} (e.g. {sorted(unknown)[0]}); another run's output?")
    pending = [(i, r) for i, r in enumerate(records) if json.dumps(r["id"]) not in done]
    print(f"{len(records)} prompts, {len(done)} already in {out}, {len(pending)} to generate")
    return pending


if __name__ == "__main__":
    run_cli(main, PROG)
