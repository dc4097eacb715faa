"""The trained tokenizer: conventions, HF export with identical ids, exact segment-cache encoding."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from data.preprocess.config import load_config
from data.preprocess.document import Document
from data.preprocess.tokenizer import train
from data.preprocess.tokenizer.encode import HFEncoder, SentencePieceEncoder, load_encoder
from data.preprocess.tokenizer.hf import CONTROL, NORMAL, USER_DEFINED, check_single_ids, load_proto
from data.preprocess.tokenizer.train import TrainingSample, read_domain_tokens, run_train_tokenizer
from megatron_patches.errors import ConfigError
from tests import transformers4

from .conftest import mixed_docs, write_jsonl

REPO = Path(__file__).resolve().parents[3]

EDGE_CASES = [
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\n\n\tdef f(x):\n        return x  # comment",
    "价格 12345.67 元，电话 010-1234",
    "emoji 😀🚀 and rare 𠀋 chars",
    "mail <EMAIL> and x<tool_call>y and <tool_call> at start",
    "<tool_call>first",
    "C++ and C# and C++17",
    "full width １２３ digits and e\u0301 combining",
    "a literal ▁ block and ▁▁ two",
    "日本語のテキスト、한국어 텍스트, русский текст",
    "ing ring singing thing",
]


@pytest.fixture(scope="module")
def sp(tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def texts():
    return EDGE_CASES + [d["text"] for d in mixed_docs(99, 150)]


def test_vocabulary_conventions(tokenizer_dir):
    proto = load_proto(tokenizer_dir / "tokenizer.model")
    pieces = list(proto.pieces)
    info = json.loads((tokenizer_dir / "tokenizer_info.json").read_text())
    assert len(pieces) % 128 == 0 and len(pieces) == info["vocab_size"] == 1024
    assert [p.piece for p in pieces[:4]] == ["<unk>", "<s>", "</s>", "<pad>"] and info["eod_id"] == 2
    reserved = [i for i, p in enumerate(pieces) if p.piece.startswith("<|reserved_")]
    assert reserved[:40] == list(range(4, 44)) and all(pieces[i].type == CONTROL for i in reserved)
    assert {p.piece for p in pieces if p.type == USER_DEFINED} == {"<EMAIL>", "<tool_call>", "C++"}
    normal = [p.piece for p in pieces if p.type == NORMAL]
    assert not [p for p in normal if re.search(r"\d", p) and len(p) > 1], "digits must be single tokens"
    assert not [p for p in normal if "ing" in p] and info["forbidden_removed"]
    assert len(reserved) >= 40 + len(info["forbidden_removed"])  # plus the padding to a multiple of 128


def test_digits_bytes_domain_tokens_and_reserved_text(sp):
    assert len(sp.encode("2024")) == 4
    assert [sp.id_to_piece(i) for i in sp.encode("😀")] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert sp.decode(sp.encode("emoji 😀 ok")) == "emoji 😀 ok"
    assert sp.encode("<EMAIL>") == [sp.piece_to_id("<EMAIL>")]
    assert sp.piece_to_id("<|reserved_3|>") not in sp.encode("<|reserved_3|>")


def test_hf_directory_gives_the_same_ids(tokenizer_dir, sp, texts):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    assert len(hf) == sp.get_piece_size() and hf.eos_token_id == 2 and hf.pad_token_id == 3
    for text in texts:
        assert hf(text)["input_ids"] == sp.encode(text), text[:60]
        if "▁" not in text:  # a literal "▁" is a space to SentencePiece, and decodes as one
            assert hf.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text


def test_segment_cache_encoder_is_exact(tokenizer_dir, sp, texts):
    encoder = load_encoder(tokenizer_dir)
    assert isinstance(encoder, SentencePieceEncoder) and encoder.cache is not None
    assert encoder.encode_batch(texts) == sp.encode(texts)
    assert encoder.encode_batch(texts[::-1]) == sp.encode(texts[::-1])  # warm cache, other order


def test_any_hf_directory_can_tokenize(tokenizer_dir, sp, texts, tmp_path):
    foreign = tmp_path / "hf"
    shutil.copytree(tokenizer_dir, foreign)
    (foreign / "tokenizer_info.json").unlink()  # not ours any more: the generic HF path is used
    encoder = load_encoder(foreign)
    assert isinstance(encoder, HFEncoder) and encoder.eod_id == 2
    assert encoder.encode_batch(texts) == sp.encode(texts)
    assert encoder.encode_batch(["</s>"]) == [sp.encode("</s>")]  # special text stays text


def test_compression_report(tokenizer_dir):
    report = json.loads((tokenizer_dir / "report.json").read_text())
    ratio = report["compression"]["unlabelled"]
    assert 0 < ratio["docs"] <= 20 and 1.0 < ratio["chars_per_token"] < 8.0
    assert report["vocab_size"] == 1024


def test_too_small_vocabulary_is_a_config_error(corpus_dir, tmp_path):
    config = load_config(None, {"tokenizer.vocab_size": 400, "tokenizer.reserved_tokens": 1000})
    with pytest.raises(ConfigError, match="too small"):
        run_train_tokenizer(config, sorted(corpus_dir.glob("*.jsonl.gz")), tmp_path / "tok")


def test_bad_lines_are_counted_and_written_aside(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", mixed_docs(5, 60))
    with open(path, "ab") as handle:
        handle.write(b"not json at all\n" + b'{"text": "ok \xff bad utf8"}\n' + b'{"id": "no-text"}\n')
    config = load_config(None, {"workers": 1, "tokenizer.vocab_size": 1024, "tokenizer.reserved_tokens": 8})
    report = run_train_tokenizer(config, [path], tmp_path / "tok")
    assert report["malformed_lines"] == 3
    assert report["malformed"] == {"invalid_json": 1, "invalid_utf8": 1, "missing_text": 1}
    malformed = (tmp_path / "tok" / "rejected" / "malformed.jsonl").read_text().splitlines()
    assert len(malformed) == 3
    assert report["docs_in"] == 60
    assert report["docs_out"] == report["train_docs"] + report["holdout_docs"] == 60


def _sampled(docs: list[Document], budget: int) -> TrainingSample:
    sample = TrainingSample(budget=budget, holdout_docs=0)
    for doc in docs:
        sample.add(doc)
    return sample


def test_training_sample_keeps_the_smallest_hashes_within_budget():
    docs = [Document(text=f"document {i:04d} ".ljust(100, "x"), id=f"doc{i}") for i in range(200)]
    everything = _sampled(docs, budget=10**9)
    assert everything.training_texts() == [d.text for d in docs]  # all of them, in input order
    sample = _sampled(docs, budget=2_000)
    smallest = sorted(docs, key=lambda d: train._unit(d.id))[:20]
    assert sample.train_docs == 20
    assert sample.training_texts() == [d.text for d in docs if d in smallest]
    assert _sampled(docs[::-1], budget=2_000).training_texts() == sample.training_texts()[::-1]


def test_training_sample_merged_from_tasks_in_any_order_is_the_one_pass_sample():
    """What Spark's treeReduce does: per-task samples merged in any order give the sample of one pass
    over every document (the training run in hash order, cut at the budget; the held-out documents)."""
    import random

    rng = random.Random(3)
    sizes = [rng.randint(20, 400) for _ in range(300)]
    channels = ("zh_web", "code")
    docs = [Document(f"{i:04d}".ljust(n, "x"), f"d{i}", channel=channels[i % 2]) for i, n in enumerate(sizes)]
    tasks = [list(enumerate(docs))[k::3] for k in range(3)]  # (input position, doc), position order

    def sample_of(entries):
        sample = TrainingSample(budget=6_000, holdout_docs=4)
        for position, doc in entries:
            sample.add(doc, (position,))
        return sample

    whole = sample_of(enumerate(docs))
    assert 0 < whole.train_docs < 100 and whole.holdout_count == 8  # the budget cut the run
    held = {text for texts in whole.holdout.values() for text in texts}
    pool = sorted((train._unit(d.id), i) for i, d in enumerate(docs) if d.text not in held)
    kept, total = set(), 0
    for _, i in pool:  # the longest run in hash order within the budget
        if total + docs[i].nbytes > 6_000:
            break
        kept, total = kept | {i}, total + docs[i].nbytes
    assert whole.training_texts() == [docs[i].text for i in sorted(kept)]
    a, b, c = (lambda k=k: sample_of(tasks[k]) for k in range(3))  # a fresh sample of each task
    for merged in (a().merge(b()).merge(c()), c().merge(a()).merge(b()), b().merge(c().merge(a()))):
        assert merged.training_texts() == whole.training_texts()
        assert merged.holdout == whole.holdout


# Run under transformers 4.57: what a 4.x-era stack (vLLM, SGLang, lm-eval) makes of the export.
TOKENIZE_SCRIPT = """
import json, sys, transformers
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(open(sys.argv[2], encoding="utf-8").read())
print(json.dumps({
    "version": transformers.__version__, "class": type(tok).__name__, "size": len(tok),
    "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id],
    "ids": [tok(text)["input_ids"] for text in texts],
}))
"""


def test_hf_directory_gives_the_same_ids_in_transformers_4(tokenizer_dir, sp, texts, tmp_path):
    (tmp_path / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    got = transformers4.run(TOKENIZE_SCRIPT, str(tokenizer_dir), str(tmp_path / "texts.json"))
    assert got["version"] == transformers4.VERSION and got["class"] == "PreTrainedTokenizerFast"
    assert got["size"] == sp.get_piece_size() and got["special"] == [1, 2, 3, 0]
    assert got["ids"] == sp.encode(texts)


def test_domain_tokens_sentencepiece_never_produces_are_refused_up_front(corpus_dir, tmp_path):
    domain = tmp_path / "domain.txt"
    domain.write_text("<EMAIL>\n# a comment\ndata model\n", encoding="utf-8")
    config = load_config(None, {"workers": 1, "tokenizer.domain_tokens": str(domain)})
    with pytest.raises(ConfigError, match=re.escape(f"'data model' ({domain}:3) contains a space")):
        run_train_tokenizer(config, sorted(corpus_dir.glob("*.jsonl.gz")), tmp_path / "tok")
    assert not (tmp_path / "tok").exists()
    domain.write_text("ok\nx▁y\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"'x▁y' ({domain}:2) contains a \"▁\"")):
        read_domain_tokens(domain)
    demo = read_domain_tokens(REPO / "data" / "demo" / "domain_tokens.txt")
    assert demo == ["<EMAIL>", "<PHONE>", "<ID_NUMBER>", "<BANK_CARD>", "<IP>"]


def test_single_id_check_catches_a_token_sentencepiece_never_produces(tmp_path):
    # Had "data model" got past the up-front refusal, the check after training stops it.
    config = load_config(None, {"workers": 1, "tokenizer.vocab_size": 1024, "tokenizer.reserved_tokens": 8})
    texts = [d["text"] for d in mixed_docs(3, 60)]
    model, removed = train.finalize(train.train_model(texts, config, ["<IP>", "data model"]), config, [])
    split_by_sentencepiece = r"token 'data model' is \[\d+(, \d+)+\] in tokenizer.model but \[\d+\]"
    with pytest.raises(ConfigError, match=split_by_sentencepiece):
        train.write_tokenizer(tmp_path, model, ["<IP>", "data model"], removed)


@pytest.mark.parametrize("token", ["C++", "<|reserved_7|>"])
def test_single_id_check_catches_an_hf_export_that_splits_a_token(tokenizer_dir, tmp_path, token):
    domain = json.loads((tokenizer_dir / "tokenizer_info.json").read_text())["domain_tokens"]
    check_single_ids(tokenizer_dir, domain)  # what training wrote passes
    broken = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, broken)
    spec = json.loads((broken / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = [added for added in spec["added_tokens"] if added["content"] != token]
    (broken / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"token {token!r} is [")):
        check_single_ids(broken, domain)
