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

import hashlib
import io
import time
from collections.abc import Iterator
from pathlib import Path

from megatron_patches.errors import ConfigError

from ..config import PipelineConfig
from ..document import Document
from ..jsonl import read_documents
from ..report import Stats, write_json_atomic, write_report
from ..stage import cpu_workers, staged_dir
from .hf import CONTROL, NORMAL, export_hf, load_proto

SPECIAL = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
MAX_SENTENCE_BYTES = 1 << 16  # SentencePiece skips longer "sentences"; longer documents are cut
VOCAB_MULTIPLE = 128


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def reserved(n: int) -> str:
    return f"<|reserved_{n}|>"


def read_token_file(path: Path | None, what: str) -> list[str]:
    if path is None:
        return []
    if not path.is_file():
        raise ConfigError(f"tokenizer.{what}: {path} is not a file")
    tokens = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(t for t in tokens if t.strip() and not t.startswith("#")))


def _unit(doc_id: str) -> float:
    digest = hashlib.blake2b(doc_id.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _documents(inputs: list[Path], text_field: str) -> Iterator[Document]:
    for path in inputs:
        for item, _ in read_documents(path, text_field):
            if isinstance(item, Document):
                yield item


def split_sample(inputs: list[Path], config: PipelineConfig, stats: Stats):
    """(training texts, held-out docs per channel): deterministic in the doc ids, two passes."""
    total = 0
    for doc in _documents(inputs, config.text_field):
        total += doc.nbytes
    rate = min(1.0, config.tokenizer.sample_mb * 1e6 / max(1, total))
    train: list[str] = []
    holdout: dict[str, list[str]] = {}
    for doc in _documents(inputs, config.text_field):
        stats["docs_in"] += 1
        stats["bytes_in"] += doc.nbytes
        u = _unit(doc.id)
        channel = doc.channel or "unlabelled"
        kept = holdout.setdefault(channel, [])
        stats["docs_out"] += 1  # every document is either held out or sampled (or neither)
        if u < 0.05 and len(kept) < config.tokenizer.holdout_docs:
            kept.append(doc.text)
            stats["holdout_docs"] += 1
        elif u < rate:
            train.extend(_chunks(doc.text))
            stats["train_docs"] += 1
    if not train:
        raise ConfigError("train-tokenizer: no training text in the input")
    return train, holdout


def _chunks(text: str) -> Iterator[str]:
    """Pieces of at most MAX_SENTENCE_BYTES bytes, cut at line ends where possible."""
    while len(text.encode("utf-8")) > MAX_SENTENCE_BYTES:
        cut = text.rfind("\n", 0, MAX_SENTENCE_BYTES // 4) + 1 or MAX_SENTENCE_BYTES // 4
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def train_model(texts: list[str], config: PipelineConfig, domain: list[str]) -> bytes:
    import sentencepiece as spm

    t = config.tokenizer
    vocab_size = round_up(t.vocab_size)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
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


def load_proto_bytes(model: bytes):
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


def run_train_tokenizer(
    config: PipelineConfig, inputs: list[Path], out: Path, overwrite: bool = False
) -> dict:
    started = time.time()
    t = config.tokenizer
    domain = read_token_file(config.path(t.domain_tokens), "domain_tokens")
    forbidden = read_token_file(config.path(t.forbidden_tokens), "forbidden_tokens")
    needed = len(SPECIAL) + t.reserved_tokens + len(domain) + 256 + 128
    if round_up(t.vocab_size) < needed:
        raise ConfigError(
            f"tokenizer.vocab_size {t.vocab_size} is too small: specials, reserved and domain tokens "
            f"and bytes need {needed}"
        )
    with staged_dir(out, overwrite) as tmp:
        stats = Stats()
        texts, holdout = split_sample(inputs, config, stats)
        model, removed = finalize(train_model(texts, config, domain), config, forbidden)
        (tmp / "tokenizer.model").write_bytes(model)
        export_hf(tmp / "tokenizer.model", tmp, SPECIAL)
        proto = load_proto(tmp / "tokenizer.model")
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
        write_json_atomic(tmp / "tokenizer_info.json", info)
        ratio = compression(tmp / "tokenizer.model", holdout)
        return write_report(
            tmp,
            "train-tokenizer",
            stats,
            started,
            vocab_size=info["vocab_size"],
            train_texts=len(texts),
            forbidden_removed=removed,
            compression=ratio,
        )
