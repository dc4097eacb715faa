"""train-tokenizer: SentencePiece BPE with the pretraining conventions, exported for HF as well.

* digits split into single tokens, byte fallback, identity normalization, whitespace kept (code);
* ids 0-3 are <unk> <s> </s> <pad>, then `reserved_tokens` unused control tokens <|reserved_N|>,
  then the user's domain tokens (never split), then bytes and learned pieces;
* pieces containing a forbidden string become further reserved control tokens (never produced);
* the vocabulary is padded with reserved tokens to a multiple of 128.

The output directory is at once a HF tokenizer directory (`AutoTokenizer.from_pretrained(dir)`) and
holds `tokenizer.model`; `tokenizer_info.json` names the special ids, and `report.json` gives the
compression (characters per token) per channel on documents held out of training.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_patches.errors import ConfigError

from ..config import PipelineConfig, TokenizerConfig
from ..engines.local import Progress
from ..jsonl import RejectWriter
from ..report import Stats, write_json_atomic
from ..skeleton import Stage, run_stage_object
from ..stage import FileTask, cpu_workers, document_batches
from .hf import CONTROL, NORMAL, check_single_ids, export_hf, load_proto
from .sample import MAX_SENTENCE_BYTES, TrainingSample, _unit  # noqa: F401 (_unit: tests check the hash)

if TYPE_CHECKING:
    from sentencepiece.sentencepiece_model_pb2 import ModelProto

SPECIAL = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
VOCAB_MULTIPLE = 128


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def reserved(n: int) -> str:
    return f"<|reserved_{n}|>"


def token_lines(path: Path | None, what: str) -> dict[str, int]:
    """Each token of a one-per-line file (blank lines and # comments skipped) -> its first line number."""
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError(f"tokenizer.{what}: {path} is not a file")
    lines = enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
    found: dict[str, int] = {}
    for number, token in lines:
        if token.strip() and not token.startswith("#"):
            found.setdefault(token, number)
    return found


def read_token_file(path: Path | None, what: str) -> list[str]:
    return list(token_lines(path, what))


def read_domain_tokens(path: Path | None) -> list[str]:
    """Domain tokens, refusing those SentencePiece could never produce from text.

    SentencePiece turns every space into "▁" before it matches user-defined symbols, so a symbol with
    a space never matches while the HF tokenizer emits it; one with a "▁" matches text with a space
    there, which the HF tokenizer does not: either way `.bin` files and the HF export would disagree.
    """
    tokens = token_lines(path, "domain_tokens")
    for token, number in tokens.items():
        for char, name in ((" ", "a space"), ("▁", 'a "▁" (SentencePiece\'s space)')):
            if char in token:
                raise ConfigError(
                    f"tokenizer.domain_tokens: {token!r} ({path}:{number}) contains {name}: SentencePiece "
                    "never produces it as one token, so the .bin files and the HF tokenizer would disagree"
                )
    return list(tokens)


def sample_task(task: FileTask, progress: Progress) -> tuple[Stats, TrainingSample]:
    """The per-task work: one task's share of the sample; malformed lines go to rejected/."""
    t, stats = task.config.tokenizer, Stats()
    sample = TrainingSample(int(t.sample_mb * 1e6), t.holdout_docs)
    rejects = RejectWriter(task.out / "rejected", task.tag)
    try:
        for batch in document_batches(task, stats, rejects, progress):
            for doc in batch:
                sample.add(doc, (task.index, task.span.part, stats["docs_in"]))
                stats["docs_in"] += 1
    finally:
        rejects.close()
    return stats, sample


def trainer_options(t: TokenizerConfig, domain: list[str]) -> dict:
    """SentencePiece trainer settings for the conventions in the module docstring."""
    return dict(
        model_type="bpe",
        vocab_size=round_up(t.vocab_size),
        hard_vocab_limit=False,  # a small corpus gives fewer pieces; padding restores the multiple
        character_coverage=t.character_coverage,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=t.max_piece_length,
        max_sentence_length=MAX_SENTENCE_BYTES,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=SPECIAL["unk"],
        bos_piece=SPECIAL["bos"],
        eos_piece=SPECIAL["eos"],
        pad_piece=SPECIAL["pad"],
        control_symbols=[reserved(i) for i in range(t.reserved_tokens)],
        user_defined_symbols=domain,
        num_threads=cpu_workers(t.threads),
        minloglevel=2,
    )


def train_model(texts: list[str], config: PipelineConfig, domain: list[str]) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, **trainer_options(config.tokenizer, domain)
        )
    except RuntimeError as err:
        raise ConfigError(f"SentencePiece training failed: {err}") from err
    return model.getvalue()


def finalize(model: bytes, config: PipelineConfig, forbidden: list[str]) -> tuple[bytes, list[str]]:
    """Turn pieces containing a forbidden string into reserved tokens; pad to a multiple of 128."""
    proto = load_proto_bytes(model)
    next_reserved = config.tokenizer.reserved_tokens
    removed = []
    for piece in proto.pieces:
        text = piece.piece.replace("▁", " ")
        if piece.type == NORMAL and any(f in text for f in forbidden):
            removed.append(piece.piece)
            piece.piece, piece.type, piece.score = reserved(next_reserved), CONTROL, 0.0
            next_reserved += 1
    while len(proto.pieces) % VOCAB_MULTIPLE:
        proto.pieces.add(piece=reserved(next_reserved), type=CONTROL, score=0.0)
        next_reserved += 1
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString(), removed


def load_proto_bytes(model: bytes) -> ModelProto:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    return proto


def compression(model_path: Path, holdout: dict[str, list[str]]) -> dict[str, dict]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    out = {}
    for channel, texts in sorted(holdout.items()):
        tokens = sum(len(ids) for ids in sp.encode(texts, num_threads=1))
        chars = sum(map(len, texts))
        out[channel] = {
            "docs": len(texts),
            "chars": chars,
            "tokens": tokens,
            "chars_per_token": round(chars / max(1, tokens), 3),
        }
    return out


def check_vocab_room(t: TokenizerConfig, domain: list[str]) -> None:
    needed = len(SPECIAL) + t.reserved_tokens + len(domain) + 256 + 128
    if round_up(t.vocab_size) < needed:
        raise ConfigError(
            f"tokenizer.vocab_size {t.vocab_size} is too small: specials, reserved and domain tokens "
            f"and bytes need {needed}"
        )


def write_tokenizer(directory: Path, model: bytes, domain: list[str], removed: list[str]) -> dict:
    """tokenizer.model, the HF files and tokenizer_info.json into `directory`; returns the info."""
    (directory / "tokenizer.model").write_bytes(model)
    export_hf(directory / "tokenizer.model", directory, SPECIAL)
    proto = load_proto(directory / "tokenizer.model")
    info = {
        "sentencepiece_model": "tokenizer.model",
        "vocab_size": len(proto.pieces),
        "eod_id": 2,
        "bos_id": 1,
        "unk_id": 0,
        "pad_id": 3,
        "reserved_ids": [i for i, p in enumerate(proto.pieces) if p.piece.startswith("<|reserved_")],
        "domain_tokens": domain,
        "forbidden_removed": removed,
    }
    write_json_atomic(directory / "tokenizer_info.json", info)
    check_single_ids(directory, domain)
    return info


class TrainTokenizerStage(Stage):
    """Per task: its share of the training sample (`sample_task`); global step: the shares merged,
    SentencePiece trained on this machine, the HF directory written."""

    name = "train-tokenizer"
    work = staticmethod(sample_task)
    report_inputs = False

    def prepare(self) -> None:
        t = self.config.tokenizer
        self.domain = read_domain_tokens(self.config.path(t.domain_tokens))
        self.forbidden = read_token_file(self.config.path(t.forbidden_tokens), "forbidden_tokens")
        check_vocab_room(t, self.domain)

    def combine(self, total: tuple[Stats, TrainingSample], more: tuple[Stats, TrainingSample]) -> tuple:
        total[0].update(more[0])  # Counter.update adds, keeping zero counts
        return total[0], total[1].merge(more[1])

    def finish(self, tmp: Path, tasks: list[FileTask], result: tuple) -> tuple[Stats, dict]:
        stats, sample = result
        stats["train_docs"], stats["holdout_docs"] = sample.train_docs, sample.holdout_count
        stats["docs_out"] = sample.train_docs + sample.holdout_count  # the documents the tokenizer saw
        texts = sample.training_texts()
        if not texts:
            raise ConfigError("train-tokenizer: no training text in the input")
        model, removed = finalize(train_model(texts, self.config, self.domain), self.config, self.forbidden)
        info = write_tokenizer(tmp, model, self.domain, removed)
        return stats, {
            "vocab_size": info["vocab_size"],
            "train_texts": len(texts),
            "forbidden_removed": removed,
            "compression": compression(tmp / "tokenizer.model", sample.holdout),
        }


def run_train_tokenizer(
    config: PipelineConfig, inputs: list[Path], out: Path, overwrite: bool = False
) -> dict:
    return run_stage_object(TrainTokenizerStage(config, out), inputs, overwrite)
