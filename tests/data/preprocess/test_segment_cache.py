"""The segment cache gives SentencePiece's own ids, id for id, on text built to break it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sentencepiece as spm

from data.preprocess.tokenizer import ascii_pieces, segment_cache
from data.preprocess.tokenizer.ascii_pieces import ascii_cuts_hold
from data.preprocess.tokenizer.encode import SentencePieceEncoder
from data.preprocess.tokenizer.hf import BYTE, CONTROL, NORMAL, UNUSED, USER_DEFINED, load_proto
from data.preprocess.tokenizer.segment_cache import SEGMENT, comes_whole, cut

ADVERSARIAL = [
    "",
    " ",
    "  ",
    "\t",
    "   leading spaces",
    "trailing spaces   ",
    "single spaced words only, with punctuation. And a trailing space ",
    " one leading space and one trailing ",
    "mixed 中文English混合text, русский и 日本語のテキスト, 한국어 텍스트",
    "digits 2024年12月31日, 3.14159, 1,000,000, 0x1F and ０１２３ full-width digits",
    "byte fallback 𠀋𠀌 𪚥 \x00 nul \x7f del \u200b zero width \ufeff bom",
    "emoji 😀🚀 👨\u200d👩\u200d👧 ❤️ 🇨🇳 and 😀😀😀",
    "whitespace   runs \t\ttabs\t \n\n newlines  \r\n crlf \x0b\x0c   ",
    "full-width\u3000space，标点！？ＡＢＣ　ａｂｃ and\xa0nbsp",
    "domain <EMAIL> and <tool_call>x and x<tool_call> and C++ and C++17 and C+ +",
    "a literal ▁ block, ▁▁ two, ▁word, word▁ and ▁ ▁ mixed with spaces",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n\n\tif x  ==  y:\n\t\tpass",
    "e\u0301 combining, \u0915\u093f Devanagari, \u0e01\u0e34 Thai",
    "ing ring singing thing",
]
ALPHABET = " " * 6 + "\u2581\t\n" + "abcxyz" + "ing" + "中文，。" + "0123" + "😀" + "<>+C" + "\u3000\u0301"


def random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def model_path(tokenizer_dir):
    return tokenizer_dir / "tokenizer.model"


@pytest.fixture(scope="module")
def sp(model_path):
    return spm.SentencePieceProcessor(model_file=str(model_path))


def variant(model_path, tmp_path, change) -> tuple[SentencePieceEncoder, spm.SentencePieceProcessor]:
    """The test model with `change(proto)` applied: our encoder and SentencePiece itself on it."""
    proto = load_proto(model_path)
    change(proto)
    path = tmp_path / "variant.model"
    path.write_bytes(proto.SerializeToString())
    return SentencePieceEncoder(path), spm.SentencePieceProcessor(model_file=str(path))


def test_cut_gives_exactly_the_regex_segments():
    """The str.split path and the regex cut a text at the same points into the same segments."""
    for text in ADVERSARIAL + random_texts(1, 2000):
        segments, words = cut(text)
        assert segments + [" " + word for word in words] == SEGMENT.findall(text)


def test_whole_piece_string_test_agrees_with_the_regex(model_path):
    """`comes_whole` (the load-time check that no piece crosses a cut) is the regex's verdict, on
    every piece of the trained model and on pieces crafted around spaces and "▁"."""
    pieces = [p.piece for p in load_proto(model_path).pieces]
    crafted = ["", " ", "\u2581", "  ", " \u2581 ", "a", " a", "\u2581a", "  a", "a ", "a\u2581", "a b"]
    crafted += ["\u2581a\u2581", " a\u2581b", "\t", " \t", "\t ", "a\tb", "\u3000", "\u2581\u2581ab", "ab  "]
    crafted += random_texts(7, 3000)
    assert any(not comes_whole(p) for p in crafted) and any(comes_whole(p) for p in pieces)
    for piece in pieces + crafted:
        assert comes_whole(piece) == (len(SEGMENT.findall(piece.replace("\u2581", " "))) == 1), repr(piece)


def test_adversarial_and_random_text_gives_sentencepiece_ids(model_path, sp):
    texts = ADVERSARIAL + random_texts(2, 1500)
    encoder = SentencePieceEncoder(model_path)
    assert encoder.cache is not None
    for batch in (texts, texts[::-1], texts[::7]):  # cold cache, warm cache, another order
        assert encoder.encode_batch(batch) == sp.encode(batch)
    for text in ADVERSARIAL:  # one text per call: no batch neighbour to hide a wrong entry
        assert encoder.encode_batch([text]) == [sp.encode(text)], text


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("cached", [True, False])
def test_long_texts_ids_as_buffers_are_sentencepiece_ids(model_path, sp, dtype, cached):
    """Long texts (Chinese without spaces goes whole) get their ids from SentencePiece as int32
    buffers, converted per batch to the dataset's dtype: the same ids, beside empty and short texts."""
    rng = random.Random(5)
    no_spaces = "中文，。句子0123abc😀\n"
    texts = ["".join(rng.choice(no_spaces) for _ in range(rng.randint(300, 900))) for _ in range(20)]
    texts += ["", "x", " ".join(ADVERSARIAL), "\n".join(random_texts(6, 40)), ""]
    encoder = SentencePieceEncoder(model_path)
    if not encoder._buffers:
        pytest.skip("this sentencepiece has no int32 buffer output")
    encoder.dtype = np.dtype(dtype)
    if not cached:
        encoder.cache = None  # every text in one call, the short ones too
    packed = encoder.encode_packed(texts)
    assert [np.frombuffer(blob, dtype).tolist() for blob in packed] == sp.encode(texts)


def test_long_segments_and_a_full_cache_start_over_exactly(model_path, sp, monkeypatch):
    monkeypatch.setattr(segment_cache, "MAX_ENTRIES", 50)
    texts = [" " * 80 + "deep indent", "x" * 200 + " y", "a b c d e f g h i j k l m n"] + random_texts(3, 300)
    encoder = SentencePieceEncoder(model_path)
    for _ in range(2):
        for start in range(0, len(texts), 20):
            assert encoder.encode_batch(texts[start : start + 20]) == sp.encode(texts[start : start + 20])
    distinct = {segment for text in texts for segment in SEGMENT.findall(text)}
    assert len(encoder.cache) < len(distinct) / 2  # it started over instead of growing
    assert all(len(key) <= segment_cache.MAX_SEGMENT for key in encoder.cache.segments)
    assert all(len(key) <= ascii_pieces.MAX_PIECE for key in encoder.cache.pieces.table)


def test_domain_token_that_spans_a_cut_sends_its_texts_whole(model_path, tmp_path):
    """A domain token with a space ("new york") would be cut in two; SentencePiece matches it
    whether the text spells the space " " or "▁", so both spellings must go whole."""
    encoder, sp = variant(
        model_path, tmp_path, lambda p: p.pieces.add(piece="new\u2581york", type=USER_DEFINED)
    )
    texts = ["in new york city", "in new\u2581york city", "new york", "new  york", "new yorkers"]
    assert encoder.cache is not None
    assert encoder.encode_batch(texts) == sp.encode(texts)
    assert sp.piece_to_id("new\u2581york") in sp.encode("in new\u2581york city")


def without_byte_fallback(proto) -> None:
    proto.trainer_spec.byte_fallback = False
    for piece in proto.pieces:
        if piece.type == BYTE:
            piece.type = CONTROL  # SentencePiece refuses byte pieces without byte fallback


@pytest.mark.parametrize(
    "change",
    [
        without_byte_fallback,  # a run of unknown characters becomes one <unk>, across any cut
        lambda p: setattr(p.trainer_spec, "model_type", 1),  # unigram: a search over the whole text
        lambda p: setattr(p.normalizer_spec, "add_dummy_prefix", True),
        lambda p: setattr(p.normalizer_spec, "escape_whitespaces", False),
        lambda p: setattr(next(q for q in p.pieces if q.type == NORMAL), "type", UNUSED),
        lambda p: p.pieces.add(piece="a\u2581b", type=NORMAL, score=-1e9),  # a piece across a cut
    ],
    ids=["no-byte-fallback", "unigram", "dummy-prefix", "raw-spaces", "unused-piece", "piece-across-cut"],
)
def test_models_the_cache_cannot_be_exact_for_get_none(model_path, tmp_path, change):
    encoder, sp = variant(model_path, tmp_path, change)
    assert encoder.cache is None
    texts = ADVERSARIAL + random_texts(4, 50)
    assert encoder.encode_batch(texts) == sp.encode(texts)


CODE_ALPHABET = "abcXYZ_" * 3 + "0129" + ".,:;()[]{}<>=+-*/'\"#\\@!?" + " " * 8 + "\n\t"


def code_texts(seed: int, n: int) -> list[str]:
    """ASCII text with letters against punctuation and digits everywhere: ASCII cuts on every side."""
    rng = random.Random(seed)
    return ["".join(rng.choice(CODE_ALPHABET) for _ in range(rng.randint(0, 120))) for _ in range(n)]


def test_ascii_cut_check_finds_pieces_across_a_letter_and_other_ascii():
    whole = ["ab", "\u2581ab", "(", "):\n", "\u2581(", "\u2581\u2581", "é", "caf\u00e9", "中文", "12"]
    assert ascii_cuts_hold(whole)
    for across in ("s.", ".s", "a1", "1a", "\na", "a\t", "x_", "_x", "\u2581self."):
        assert not ascii_cuts_hold(["ab", across, "cd"]), across


def test_first_seen_ascii_segments_by_their_pieces_give_sentencepiece_ids(model_path, sp):
    texts = code_texts(8, 600) + ADVERSARIAL
    encoder = SentencePieceEncoder(model_path)
    assert encoder.cache is not None and encoder.cache.pieces is not None  # the trained model allows them
    for start in range(0, len(texts), 50):  # new segments in every batch, old ones too
        assert encoder.encode_batch(texts[start : start + 50]) == sp.encode(texts[start : start + 50])
    pieces = encoder.cache.pieces.table
    assert len(pieces) > 100
    assert any(ascii_pieces.ACROSS_ASCII_CUT.search(key) for key in encoder.cache.segments)  # they were cut


def test_a_piece_across_an_ascii_cut_turns_ascii_cuts_off_exactly(model_path, tmp_path):
    encoder, sp = variant(model_path, tmp_path, lambda p: p.pieces.add(piece="b.", type=NORMAL, score=-1e9))
    assert encoder.cache is not None and encoder.cache.pieces is None
    texts = code_texts(9, 200) + ["a.b.c ab.cd b.b. x b."]
    assert encoder.encode_batch(texts) == sp.encode(texts)


def test_a_domain_token_an_ascii_cut_would_split_keeps_its_batch_whole(model_path, tmp_path):
    def add(proto) -> None:
        proto.pieces.add(piece="<call_x>", type=USER_DEFINED)
        proto.pieces.add(piece="v2.0b", type=USER_DEFINED)

    encoder, sp = variant(model_path, tmp_path, add)
    assert encoder.cache is not None and encoder.cache.pieces is not None
    texts = ["call x<call_x>(y) then v2.0b and v2.0 and <call_x>", *code_texts(10, 100)]
    for batch in (texts, texts[1:], texts[:1]):
        assert encoder.encode_batch(batch) == sp.encode(batch)
    assert {sp.piece_to_id("<call_x>"), sp.piece_to_id("v2.0b")} <= set(sp.encode(texts[0]))
