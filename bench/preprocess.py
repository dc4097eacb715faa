"""Throughput per core of clean, dedup signatures and tokenize, beside same-run baselines.

    pip install -e '.[bench]'            # datasketch, the MinHash baseline
    python bench/preprocess.py --mb 200  # generates (and caches) a mixed zh/en/code corpus
    python bench/preprocess.py --only tokenize --repeat 3   # tokenize rows only, 3 rounds in turn

Every figure is megabytes of JSONL text per CPU-second of one process (`time.process_time`, so other
load on a shared machine does not count), measured in this run:

* clean      ours: the clean stage (read, rules, PII masking, write) on one core;
             floor: read + json.loads + json.dumps + write, the least any stage can do.
* minhash    ours: `MinHasher.signature` (numpy, 128 permutations, character 5-grams);
             baseline: `datasketch.MinHash(num_perm=128).update_batch` on the same 5-gram shingles.
* tokenize   ours: the tokenize stage (read, encode with the segment cache, EOD, .bin/.idx parts),
             starting from an empty cache, timed twice: on the same bytes as the baselines (the
             first `--baseline-mb` megabytes) and over the whole corpus;
             baselines: what Megatron-LM's tools/preprocess_data.py does per document, i.e.
             json.loads, the tokenizer call (HF: `tokenizer(text).input_ids` as Megatron's
             HuggingFaceTokenizer; SentencePiece: `encode_as_ids` as GPTSentencePieceTokenizer),
             `IndexedDatasetBuilder.add_item(torch.tensor(ids))` + `end_document`; loading the
             tokenizer is timed on every side (each Megatron-LM worker loads it in
             `Encoder.initializer`, as our stage loads its encoder).
Baselines run on the first `--baseline-mb` megabytes (their per-core rate does not depend on size).
Ours does depend on size: its segment cache warms up as it goes, so the "same bytes" ratio compares
like with like, and the "full corpus" ratio shows what the cache gains on a larger input (ours over
all of it against the baselines' rate on the first `--baseline-mb`).
The tokenize contenders take turns (`bench/turns.py`): each runs in a fresh process of its own, and
they alternate by twentieths of their input, one at a time, so a shared machine's changing speed falls
on all of them alike (measured one after the other, a 1-second contender and a 4-second baseline met
different machines, and single rounds' ratios moved by 25 %). A figure is still one process's CPU time
over its whole run. With `--repeat N` there are N such rounds; figures are the median (min-max) and
each ratio compares one round's figures.
"The tokenizer call only" lines time `encode_packed` (ours: what the stage calls, ids packed as
bytes) against `encode_as_ids` and `tokenizer(text).input_ids` on each language's documents alone,
in turns as well (tokenizers loaded before the clock starts).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from turns import Turns, in_turns  # noqa: E402  (bench/ is on sys.path: the script's folder)

from data.demo import synth  # noqa: E402
from data.preprocess.config import load_config  # noqa: E402
from data.preprocess.dedup.hashing import MinHasher, normalize, shingle_hashes  # noqa: E402
from data.preprocess.engines.local import Progress  # noqa: E402
from data.preprocess.label import LabelConfig, content_kind, language  # noqa: E402
from data.preprocess.stage import FileTask  # noqa: E402
from data.preprocess.steps import clean_file  # noqa: E402
from data.preprocess.tokenize import TokenizeTask, tokenize_file  # noqa: E402
from data.preprocess.tokenizer.encode import load_encoder  # noqa: E402

FILE_MB = 25
STAGES = ("clean", "minhash", "tokenize")


def _documents(rng: random.Random):
    """zh / en / code documents, each kind chosen to keep the bytes at 40 / 40 / 20 percent."""
    sources = synth.stdlib_sources()
    makers = (lambda: synth.zh_doc(rng), lambda: synth.en_doc(rng), lambda: synth.code_doc(rng, sources))
    budget, done = (0.4, 0.4, 0.2), [0, 0, 0]
    while True:
        kind = min(range(3), key=lambda k: done[k] / budget[k])
        text = makers[kind]()
        done[kind] += len(text.encode())
        yield text


def make_corpus(directory: Path, mb: int) -> list[Path]:
    """`mb` megabytes of JSONL in files of FILE_MB megabytes; reused when already there."""
    files = sorted(directory.glob("part-*.jsonl"))
    if files and size(files) >= mb * 1e6 * 0.98:
        return files
    directory.mkdir(parents=True, exist_ok=True)
    documents, index, written = _documents(random.Random(0)), 0, 0
    for part in range(-(-mb // FILE_MB)):
        with open(directory / f"part-{part:03d}.jsonl", "w", encoding="utf-8") as handle:
            in_file = 0
            while in_file < min(FILE_MB, mb - part * FILE_MB) * 1e6:
                line = json.dumps({"id": f"b{index}", "text": next(documents)}, ensure_ascii=False) + "\n"
                handle.write(line)
                in_file += len(line.encode())
                index += 1
            written += in_file
    return sorted(directory.glob("part-*.jsonl"))


def cpu_rate(fn, nbytes: int) -> float:
    start = time.process_time()
    fn()
    return nbytes / max(time.process_time() - start, 1e-9) / 1e6


def isolated(fn, *args) -> float:
    """Run one measurement in a fresh process, so no contender inherits another's heap or caches."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def first_bytes(files: list[Path], mb: float) -> list[str]:
    lines, total = [], 0
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                lines.append(line)
                total += len(line.encode())
                if total >= mb * 1e6:
                    return lines
    return lines


def size_of_lines(lines: list[str]) -> int:
    return sum(len(line.encode()) for line in lines)


def size(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def texts_of(lines: list[str]) -> list[str]:
    return [json.loads(line)["text"] for line in lines]


def nbytes(texts: list[str]) -> int:
    return sum(len(t.encode()) for t in texts)


def clean_ours(files: list[Path], out: Path) -> float:
    config = load_config(None, {"workers": 1, "shard_docs": 10**9})
    (out / "clean").mkdir(parents=True, exist_ok=True)

    def run():
        for i, path in enumerate(files):
            clean_file(FileTask(i, path, out / "clean", config), Progress(lambda d, b: None))

    return cpu_rate(run, size(files))


def clean_floor(sample: list[str], out: Path) -> float:
    def run():
        with open(out / "floor.jsonl", "w", encoding="utf-8") as handle:
            for line in sample:
                handle.write(json.dumps(json.loads(line), ensure_ascii=False) + "\n")

    return cpu_rate(run, size_of_lines(sample))


def minhash_ours(files: list[Path]) -> float:
    texts = texts_of(first_bytes(files, 10**9))
    hasher = MinHasher(num_perm=128, ngram=5)
    return cpu_rate(lambda: [hasher.signature(t) for t in texts], nbytes(texts))


def minhash_datasketch(sample: list[str]) -> float | None:
    try:
        from datasketch import MinHash
    except ImportError:
        print("datasketch is not installed: pip install -e '.[bench]' for the MinHash baseline")
        return None
    texts = texts_of(sample)
    assert shingle_hashes("abcdef", 5).size == 2  # the same 5-gram definition on both sides

    def run():
        for text in texts:
            norm = normalize(text)
            shingles = {norm[i : i + 5].encode() for i in range(max(1, len(norm) - 4))}
            MinHash(num_perm=128).update_batch(list(shingles))

    return cpu_rate(run, nbytes(texts))


class _TurnProgress:
    """The stage's progress reports (once per batch of documents) as the points where it takes turns."""

    def __init__(self, turns: Turns):
        self.turns = turns

    def update(self, docs: int, nbytes: int) -> None:
        self.turns.advance(nbytes)

    def flush(self) -> None:
        pass


def tokenize_ours(files: list[Path], out: Path, tokenizer: Path, turns: Turns) -> float:
    config = load_config(None, {"workers": 1})
    out.mkdir(parents=True, exist_ok=True)
    progress = _TurnProgress(turns)
    with turns.timed() as clock:
        for i, path in enumerate(files):
            tokenize_file(TokenizeTask(i, path, out, config, tokenizer=tokenizer), progress)
    return size(files) / clock.seconds / 1e6


def _tokenizer_call(tokenizer: Path, kind: str):
    if kind == "ours":
        encoder = load_encoder(tokenizer)
        return encoder.encode_packed
    if kind == "hf":
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        return lambda texts: [hf(t).input_ids for t in texts]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    return lambda texts: [sp.encode_as_ids(t) for t in texts]


def tokenize_megatron_lm(sample: list[str], out: Path, tokenizer: Path, kind: str, turns: Turns) -> float:
    """json.loads, the tokenizer call, IndexedDatasetBuilder.add_item + end_document, per document."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    torch.set_num_threads(1)
    sizes = [len(line.encode()) for line in sample]
    with turns.timed() as clock:
        # Loading the tokenizer is timed, as each of Megatron-LM's workers loads it
        # (Encoder.initializer) and as our stage loads its encoder.
        encode = _tokenizer_call(tokenizer, kind)
        builder = IndexedDatasetBuilder(str(out / f"baseline-{kind}.bin"), dtype=np.uint16)
        for line, nbytes in zip(sample, sizes, strict=True):
            ids = encode([json.loads(line)["text"]])[0]
            ids.append(2)
            builder.add_item(torch.tensor(ids))
            builder.end_document()
            turns.advance(nbytes)
        builder.finalize(str(out / f"baseline-{kind}.idx"))
    return sum(sizes) / clock.seconds / 1e6


def tokenizer_call_only(texts: list[str], tokenizer: Path, kind: str, turns: Turns) -> float:
    encode = _tokenizer_call(tokenizer, kind)
    batches = [texts[i : i + 256] for i in range(0, len(texts), 256)]
    sizes = [nbytes(batch) for batch in batches]
    with turns.timed() as clock:
        for batch, batch_bytes in zip(batches, sizes, strict=True):
            encode(batch)
            turns.advance(batch_bytes)
    return sum(sizes) / clock.seconds / 1e6


def by_language(sample: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for text in texts_of(sample):
        kind = "code" if content_kind(text, LabelConfig()) == "code" else language(text)
        groups.setdefault(kind, []).append(text)
    return groups


def train_tokenizer(files: list[Path], directory: Path, vocab: int) -> Path:
    from data.preprocess.tokenizer.train import run_train_tokenizer

    target = directory / f"tokenizer-{vocab}"
    if not (target / "report.json").is_file():
        settings = {
            "tokenizer.vocab_size": vocab,
            "tokenizer.sample_mb": 20.0,
            "tokenizer.reserved_tokens": 1000,
        }
        run_train_tokenizer(load_config(None, settings), files[:2], target, overwrite=True)
    return target


def tokenizer_calls(sample: list[str], tokenizer: Path) -> None:
    for kind, texts in sorted(by_language(sample).items()):
        if kind in ("zh", "en", "code"):
            rates = in_turns(
                {k: (tokenizer_call_only, (texts, tokenizer, k), nbytes(texts)) for k in ("ours", "sp", "hf")}
            )
            mine, sp_rate, hf_rate = rates["ours"], rates["sp"], rates["hf"]
            print(
                f"  tokenizer call only, {kind:>4} ({nbytes(texts) / 1e6:4.1f} MB): ours {mine:6.2f}  "
                f"SentencePiece {sp_rate:6.2f} ({mine / sp_rate:4.2f}x)  "
                f"HF __call__ {hf_rate:6.2f} ({mine / hf_rate:4.2f}x)"
            )


def write_sample(sample: list[str], path: Path) -> Path:
    """The baselines' lines as a file, so that our stage reads exactly the bytes they parse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(sample)
    return path


def tokenize_round(files: list[Path], sample: list[str], out: Path, tokenizer: Path) -> dict[str, float]:
    """One round of every tokenize contender, in turns, each in a fresh process (so an empty cache)."""
    same_bytes = write_sample(sample, out / "same-bytes.jsonl")
    return in_turns(
        {
            "same": (tokenize_ours, ([same_bytes], out / "tok-same-bytes", tokenizer), size([same_bytes])),
            "full": (tokenize_ours, (files, out / "tok-full", tokenizer), size(files)),
            "hf": (tokenize_megatron_lm, (sample, out, tokenizer, "hf"), size_of_lines(sample)),
            "sp": (tokenize_megatron_lm, (sample, out, tokenizer, "sp"), size_of_lines(sample)),
        }
    )


def tokenize_rows(files: list[Path], sample: list[str], out: Path, tokenizer: Path, repeat: int) -> list:
    """Ours (on the baselines' bytes and on the whole corpus) and both baselines, measured in turn
    `repeat` times so that load changes hit all of them; each ratio compares one round's figures."""
    rounds = []
    for k in range(repeat):
        r = tokenize_round(files, sample, out, tokenizer)
        print(
            f"  tokenize round {k + 1}: ours same bytes {r['same']:.2f}, full corpus {r['full']:.2f}  "
            f"megatron-lm HF {r['hf']:.2f} ({r['same'] / r['hf']:.2f}x, {r['full'] / r['hf']:.2f}x)  "
            f"SentencePiece {r['sp']:.2f} ({r['same'] / r['sp']:.2f}x, {r['full'] / r['sp']:.2f}x)"
        )
        rounds.append(r)
    rows = []
    for ours, label in (("same", "tokenize, same bytes"), ("full", "tokenize, full corpus")):
        for baseline, name in (("hf", "megatron-lm (HF tokenizer)"), ("sp", "megatron-lm (SentencePiece)")):
            rows.append((label, [r[ours] for r in rounds], name, [r[baseline] for r in rounds]))
    return rows


def _shown(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def print_rows(rows: list) -> None:
    print(f"{'stage':<24}{'ours':>22}  {'baseline':<30}{'baseline':>22}{'ratio':>22}")
    for stage, mine, name, theirs in rows:
        mine = mine if isinstance(mine, list) else [mine]
        if theirs is None:
            print(f"{stage:<24}{_shown(mine):>22}  {name:<30}{'-':>22}{'-':>22}")
            continue
        theirs = theirs if isinstance(theirs, list) else [theirs]
        ratios = [m / t for m, t in zip(mine, theirs, strict=True)]
        print(f"{stage:<24}{_shown(mine):>22}  {name:<30}{_shown(theirs):>22}{_shown(ratios) + 'x':>22}")
    print(
        "tokenize ratios: 'same bytes' times ours on exactly the baselines' input; 'full corpus' "
        "times ours over the whole corpus (segment cache warming up) against the baselines' rate"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="corpus size in MB (default 200)")
    parser.add_argument("--baseline-mb", type=float, default=20.0, help="MB the baselines run on")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / ".cache")
    parser.add_argument("--only", choices=STAGES, action="append", help="measure only these (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, help="tokenize rounds; median (min-max) shown")
    args = parser.parse_args()
    stages = args.only or STAGES
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    warnings.filterwarnings("ignore")  # megatron-core's notes about optional GPU packages
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # and in the measuring processes
    files = make_corpus(args.workdir / f"corpus-{args.mb}mb", args.mb)
    tokenizer = train_tokenizer(files, args.workdir, args.vocab) if "tokenize" in stages else None
    sample = first_bytes(files, args.baseline_mb)
    out = args.workdir / "out"
    print(
        f"corpus: {size(files) / 1e6:.0f} MB in {len(files)} files; baselines (and ours, 'same bytes') "
        f"on {size_of_lines(sample) / 1e6:.1f} MB; "
        f"{os.cpu_count()} cores; figures in MB/s per core (CPU time)"
    )
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if "tokenize" in stages:
        tokenizer_calls(sample, tokenizer)
    if "clean" in stages:
        floor = isolated(clean_floor, sample, out)
        rows.append(("clean", isolated(clean_ours, files, out), "read+parse+write floor", floor))
    if "minhash" in stages:
        theirs = isolated(minhash_datasketch, sample)
        rows.append(("minhash signatures", isolated(minhash_ours, files), "datasketch", theirs))
    if "tokenize" in stages:
        rows += tokenize_rows(files, sample, out, tokenizer, max(1, args.repeat))
    print_rows(rows)


if __name__ == "__main__":
    main()
