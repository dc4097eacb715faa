"""``python -m tools.eval {ppl,probes,bench,inspect} ...``: offline evaluation of HF exports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_patches import cpu, paths
from megatron_patches.errors import ConfigError, run_cli
from tools.eval.rewrites import REWRITES
from tools.hf_runtime.loading import DTYPES, load_model, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tools.eval.ppl import Channel, ChannelResult

PROG = "python -m tools.eval"


def _model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--hf", required=required, help="HF model directory (an export)")
    parser.add_argument("--tokenizer", help="HF tokenizer directory (default: the model directory)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run modeling code shipped with the export (Baichuan2); only for exports you trust",
    )


def _ppl_args(sub: argparse._SubParsersAction) -> None:
    ppl = sub.add_parser("ppl", help="loss and perplexity per held-out channel")
    _model_args(ppl, required=False)
    ppl.add_argument("--checkpoints", type=Path, help="a run directory: evaluate every export/checkpoint")
    ppl.add_argument(
        "--data", action="append", required=True, help="JSONL file, directory, or .bin/.idx prefix"
    )
    ppl.add_argument("--seq-length", type=int, default=1024)
    ppl.add_argument("--batch-size", type=int, default=4)
    ppl.add_argument("--max-tokens", type=int, help="stop each channel after this many predicted tokens")
    ppl.add_argument("--text-key", default="text")
    ppl.add_argument("--csv", type=Path, help="also write the table as CSV (single model)")
    ppl.add_argument(
        "--out-dir", type=Path, help="--checkpoints: where ppl.csv/ppl.png go (default RUN/eval)"
    )
    ppl.add_argument(
        "--convert", action="store_true", help="--checkpoints: convert Megatron-only checkpoints"
    )


def _probes_args(sub: argparse._SubParsersAction) -> None:
    probes = sub.add_parser("probes", help="the training probe file on an HF model")
    _model_args(probes)
    probes.add_argument("--probes", required=True, type=Path, help="probe file (YAML or JSONL)")
    probes.add_argument("--vocab-size", type=int, help="real vocabulary when the export kept padding rows")
    probes.add_argument("--json", type=Path, help="also write {probe/<name>: score} here")


def _bench_args(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="rewritten multiple-choice benchmark, scored generatively")
    _model_args(bench)
    bench.add_argument(
        "--data", type=Path, required=True, help="benchmark JSONL (see tools/eval/rewrites.py)"
    )
    bench.add_argument("--rewrite", default="original", choices=REWRITES)
    bench.add_argument("--shots", type=int, default=0, help="solved examples before each question")
    bench.add_argument("--dev", type=Path, help="take the examples from this file (default: head of --data)")
    bench.add_argument("--max-new-tokens", type=int, default=16)
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--none-text", default=None, help="the none-correct rewrite's option text")
    bench.add_argument(
        "--seed", type=int, default=0, help="draws the option order of every rewrite but original"
    )
    bench.add_argument("--out", type=Path, help="per-item records (JSONL)")


def _inspect_args(sub: argparse._SubParsersAction) -> None:
    inspect = sub.add_parser("inspect", help="lenses: layer cosine distance, logit lens, attention")
    _model_args(inspect)
    inspect.add_argument("--text", required=True)
    inspect.add_argument("--top-k", type=int, default=5)
    inspect.add_argument("--position", type=int, default=-1, help="token whose logit lens is printed")
    inspect.add_argument(
        "--attention",
        type=int,
        nargs=4,
        metavar=("LAYER", "HEAD", "QUERY", "KEY"),
        help="print the weight of token QUERY on token KEY at LAYER/HEAD (0-based; negative: from the end)",
    )
    inspect.add_argument("--plot", type=Path, help="also draw heat maps into this PNG")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_subcommand in (_ppl_args, _probes_args, _bench_args, _inspect_args):
        add_subcommand(sub)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu.quiet_expected_warnings()  # Megatron-Core's CPU-only import warnings (no-op on GPU)
    return {"ppl": run_ppl, "probes": run_probes, "bench": run_bench, "inspect": run_inspect}[args.command](
        args
    )


def _load(args: argparse.Namespace, hf_dir: str | Path | None = None, **kwargs) -> tuple:
    """(model, tokenizer) of ``hf_dir`` (default ``--hf``) as the command line asks."""
    hf_dir = hf_dir or args.hf
    model = load_model(hf_dir, args.dtype, args.device, trust_remote_code=args.trust_remote_code, **kwargs)
    return model, _tokenizer(args, hf_dir)


def _tokenizer(args: argparse.Namespace, hf_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    return load_tokenizer(args.tokenizer or hf_dir or args.hf, args.trust_remote_code)


def run_ppl(args: argparse.Namespace) -> int:
    from tools.eval import ppl

    if bool(args.hf) == bool(args.checkpoints):
        raise ConfigError("ppl needs exactly one of --hf DIR or --checkpoints RUN_DIR")
    _require_positive(args, "seq_length", "batch_size", "max_tokens")
    channels = ppl.find_channels(args.data)
    return _ppl_trend(args, channels) if args.checkpoints else _ppl_single(args, channels)


def _ppl_single(args: argparse.Namespace, channels: list[Channel]) -> int:
    from tools.eval import ppl, trends

    results = _evaluate_export(args, args.hf, channels)
    print(ppl.format_table(results))
    _print_skipped(results)
    if args.csv:
        trends.write_csv([(0, r) for r in results], args.csv)
    return 0


def _ppl_trend(args: argparse.Namespace, channels: list[Channel]) -> int:
    from tools.eval import ppl, trends

    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    snapshots = trends.find_snapshots(args.checkpoints)
    ready, skipped = trends.resolve_hf_dirs(snapshots, args.checkpoints / "hf", args.convert, tokenizer)
    rows = []
    for iteration, hf_dir in ready:
        results = _evaluate_export(args, hf_dir, channels)
        print(f"iteration {iteration} ({hf_dir})\n{ppl.format_table(results)}", flush=True)
        rows += [(iteration, r) for r in results]
    out_dir = args.out_dir or args.checkpoints / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    trends.write_csv(rows, out_dir / "ppl.csv")
    trends.plot_trends(rows, out_dir / "ppl.png")
    for note in skipped:
        print(f"skipped {note}")
    print(f"wrote {out_dir / 'ppl.csv'} and {out_dir / 'ppl.png'}")
    return 0


def _evaluate_export(
    args: argparse.Namespace, hf_dir: str | Path, channels: list[Channel]
) -> list[ChannelResult]:
    """Per-channel results of one export. The model lives only in this call, so the trend loop
    frees one checkpoint before it loads the next instead of holding two at its peak."""
    from tools.eval import ppl

    model, tokenizer = _load(args, hf_dir)
    options = dict(batch_size=args.batch_size, max_tokens=args.max_tokens, text_key=args.text_key)
    return ppl.evaluate_channels(model, tokenizer, channels, _seq_length(args, model), **options)


def _seq_length(args: argparse.Namespace, model: PreTrainedModel) -> int:
    limit = getattr(model.config, "max_position_embeddings", args.seq_length)
    return min(args.seq_length, limit)


def _require_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _print_skipped(results: list[ChannelResult]) -> None:
    for result in results:
        for reason in result.skipped[:5]:
            print(f"skipped {reason}", file=sys.stderr)
        if len(result.skipped) > 5:
            print(f"skipped {len(result.skipped) - 5} more lines of {result.channel}", file=sys.stderr)


def run_probes(args: argparse.Namespace) -> int:
    from megatron_patches.probe_scoring import load_probes, probe_rows
    from tools.eval.probes import score_hf

    probes = load_probes(args.probes)
    probe_rows(probes, _tokenizer(args))  # bad probes fail before the model loads
    model, tokenizer = _load(args)
    scores = {f"probe/{k}": v for k, v in score_hf(model, tokenizer, probes, args.vocab_size).items()}
    for name, value in scores.items():
        print(f"{name:<40} {value:.6f}")
    if args.json:
        paths.write_json_atomic(args.json, scores, indent=1, ensure_ascii=True)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from tools.eval import bench
    from tools.eval.rewrites import NONE_CORRECT
    from tools.hf_runtime.generation import Sampling, check_sampling, generate

    sampling = Sampling(max_new_tokens=args.max_new_tokens, stop="\n")
    check_sampling(sampling)
    _require_positive(args, "batch_size")
    model, tokenizer = _load(args)
    result = bench.run_bench(
        args.data,
        args.rewrite,
        lambda prompts: generate(model, tokenizer, prompts, sampling, args.batch_size),
        shots=args.shots,
        dev=args.dev,
        none_text=args.none_text or NONE_CORRECT,
        seed=args.seed,
    )
    print(bench.summary(result))
    if args.out:
        bench.write_records(result, args.out)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from tools.eval import inspect
    from tools.eval.families import require_family

    require_family(args.hf)
    model, tokenizer = _load(args, attn_implementation="eager")
    tokens, distances = inspect.cosine_distances(model, tokenizer, args.text)
    print(inspect.cosine_table(tokens, distances), end="\n\n")
    _, probs, ids = inspect.logit_lens(model, tokenizer, args.text, args.top_k)
    print(inspect.lens_table(tokens, probs, ids, tokenizer, args.position))
    weights, title = None, ""
    if args.attention:
        layer, head, query, key = args.attention
        _, weights = inspect.attention(model, tokenizer, args.text, layer, head)
        print("\n" + inspect.attention_line(tokens, weights, layer, head, query, key))
        title = f"attention layer {layer} head {head}"
    if args.plot:
        words = [[tokenizer.decode([i]) for i in row] for row in ids[..., 0].tolist()]
        inspect.plot(args.plot, tokens, distances, probs[..., 0], words, weights, title)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    run_cli(main, PROG)
