"""Export a SentencePiece BPE model as a HuggingFace tokenizer directory with the same ids.

SentencePiece BPE merges, at every step, the adjacent pair whose concatenation is the best-scored
vocabulary piece. A `tokenizers` BPE model does the same when its merge list holds every way of
splitting each normal piece into two normal pieces, ranked by the merged piece's id (SentencePiece
orders normal BPE pieces by score). The models trained here use identity normalization and no dummy
prefix, so the only normalization left is " " -> "▁"; control symbols become special tokens and
user-defined symbols plain added tokens, both matched before BPE as SentencePiece does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_patches.errors import ConfigError

if TYPE_CHECKING:
    from sentencepiece.sentencepiece_model_pb2 import ModelProto
    from tokenizers import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def load_proto(path: Path) -> ModelProto:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def merges_of(proto: ModelProto) -> list[tuple[str, str]]:
    pieces = list(proto.pieces)
    normal = {p.piece: i for i, p in enumerate(pieces) if p.type == NORMAL}
    ranked = []
    for piece, merged_id in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((merged_id, normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(proto: ModelProto) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the SentencePiece model `proto`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    spec = proto.normalizer_spec
    if spec.name != "identity" or spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        raise ConfigError(
            "HF export needs a model trained with identity normalization, no dummy prefix and "
            f"whitespace kept (got {spec.name}, add_dummy_prefix={spec.add_dummy_prefix})"
        )
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = next(p.piece for p in proto.pieces if p.type == UNKNOWN)
    bpe = models.BPE(vocab=vocab, merges=merges_of(proto), unk_token=unk, byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [p.piece for p in proto.pieces if p.type in (UNKNOWN, CONTROL)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    users = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in users])
    return tok


def export_hf(model_path: Path, out_dir: Path, special: dict[str, str]) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ the .model) into `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    proto = load_proto(model_path)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(proto),
        bos_token=special["bos"],
        eos_token=special["eos"],
        unk_token=special["unk"],
        pad_token=special["pad"],
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(str(out_dir))
    _name_a_portable_class(out_dir / "tokenizer_config.json")
    if model_path.resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(model_path, out_dir / "tokenizer.model")


def _name_a_portable_class(tokenizer_config: Path) -> None:
    """transformers 5 saves this tokenizer as ``TokenizersBackend``, a class transformers 4 refuses;
    ``PreTrainedTokenizerFast`` names the same class in both (an alias in 5), so 4.x-era stacks load it."""
    values = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    values["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_single_ids(directory: Path, domain: list[str]) -> None:
    """Every domain and reserved token is one id, the same, in ``tokenizer.model`` and the HF export.

    Domain tokens must encode to that id from text in both; reserved tokens are control symbols,
    which SentencePiece never produces from text, so there the piece must map to its id, and the HF
    tokenizer (which matches them as special tokens) must encode them to it.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    reserved = [piece for piece in pieces if piece.startswith("<|reserved_")]
    sp_ids = dict(zip(domain, sp.encode(domain), strict=True))
    sp_ids |= {piece: [sp.piece_to_id(piece)] for piece in reserved}
    for token, ids in sp_ids.items():
        hf_ids = hf.encode(token, add_special_tokens=False)
        if len(ids) != 1 or pieces[ids[0]] != token or hf_ids != ids:
            raise ConfigError(
                f"train-tokenizer: token {token!r} is {ids} in tokenizer.model but {hf_ids} in the HF "
                "export; every domain and reserved token must be one id, the same in both"
            )
