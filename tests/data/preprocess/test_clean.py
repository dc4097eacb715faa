"""Clean rules: junk goes with the right rule and value; prose, code and markdown stay."""

from __future__ import annotations

import json
import random

import pytest

from data.demo import synth
from data.preprocess import clean, filters, repetition
from data.preprocess.config import load_config
from data.preprocess.document import Document
from data.preprocess.stage import run_file_stage
from data.preprocess.steps import build_cleaner, clean_file
from data.preprocess.thresholds import thresholds_from
from megatron_patches.errors import ConfigError

from .conftest import config_for, write_jsonl


@pytest.fixture
def cleaner(tmp_path):
    (tmp_path / "block.txt").write_text("# spam words\n免费彩票\n", encoding="utf-8")
    return build_cleaner(config_for(tmp_path, **{"clean.blocklists": [str(tmp_path / "block.txt")]}))


def verdict(cleaner, text):
    doc = Document(text=text, id="x")
    return cleaner(doc, cleaner.channel_of(doc))


def test_each_kind_of_junk_is_rejected_by_its_rule(cleaner):
    for expected, text in synth.junk_docs(random.Random(5)):
        keep, rule, value = verdict(cleaner, text)
        assert not keep and rule == expected, (expected, rule, value, text[:80])
        assert value is not None


def test_good_prose_code_markdown_and_math_are_kept_in_every_language(cleaner):
    rng = random.Random(6)
    files = synth.stdlib_sources()
    makers = {
        "zh_web": lambda: synth.zh_doc(rng),
        "en_web": lambda: synth.en_doc(rng),
        "code": lambda: synth.code_doc(rng, files),
        "markdown": lambda: synth.markdown_doc(rng),
        "math": lambda: synth.math_doc(rng),
    }
    for channel, make in makers.items():
        texts = [make() for _ in range(60)]
        kept = 0
        for text in texts:
            doc = Document(text=text, id="x")
            assert cleaner.channel_of(doc) == channel or channel == "code", (channel, text[:80])
            kept += verdict(cleaner, text)[0]
        assert kept >= 0.95 * len(texts), (channel, kept)


def test_code_is_not_judged_by_prose_rules(cleaner):
    code = "\n".join(["    }", "  }", "}", "x = {k: v for k, v in items}", "if (a && b) { return c; }"] * 12)
    assert filters.check(code, cleaner.default)[0] is False  # prose thresholds would drop it
    assert verdict(cleaner, code)[0] is True  # the code channel's thresholds keep it


def test_measures():
    stats = clean.measure("中文abc 123 !!")
    assert (stats.zh_ratio, stats.en_ratio, stats.digit_ratio, stats.symbol_ratio) == (
        2 / 10,
        3 / 10,
        3 / 10,
        2 / 10,
    )
    assert clean.measure("see https://example.com/x now").url_ratio == pytest.approx(21 / 29)
    assert repetition.duplicate_line_fractions("a\nb\na\na") == (0.5, 0.5)
    tokens = repetition.words("one two one two one two three")
    assert repetition.top_ngram_fraction(tokens, 2) == pytest.approx(3 * 6 / 23)  # "one two" x3
    assert repetition.duplicate_ngram_fraction(tokens, 2) == pytest.approx(18 / 23)  # all but "three"
    assert repetition.words("中文 text") == ["中", "文", "text"]


def test_top_ngram_ties_go_to_the_longest_whatever_the_hash_seed():
    """Python's str hash differs per process; a tie must not be broken by it, or the clean report
    (and a threshold decision) would depend on which worker read the document."""
    tokens = ["x", "y", "x", "y", "x", "y", "long", "words", "long", "words", "long", "words"]
    # "x y" and "long words" both occur 3 times; the longer one counts: 3 * 9 of 33 characters
    assert repetition.top_ngram_fraction(tokens, 2) == pytest.approx(27 / 33)


def test_per_channel_thresholds_from_config(tmp_path):
    config = config_for(tmp_path, **{"clean.channels": {"code": {"min_chars": 10_000}}})
    code = synth.code_doc(random.Random(1), synth.stdlib_sources())
    keep, rule, value = build_cleaner(config)(Document(text=code, id="c"), "code")
    assert (keep, rule, value) == (False, "too_short", len(code))
    with pytest.raises(ConfigError, match="unknown config key 'clean.thresholds.min_charz'"):
        build_cleaner(config_for(tmp_path, **{"clean.thresholds": {"min_charz": 3}}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"clean.thresholds": {"max_digit_ratoi": 0.2}},
            "unknown config key 'clean.thresholds.max_digit_ratoi'; did you mean 'max_digit_ratio'?",
        ),
        (
            {"clean.channels": {"code": {"min_char": 5}}},
            "unknown config key 'clean.channels.code.min_char'; did you mean 'min_chars'?",
        ),
        ({"clean.thresholds": {"min_chars": "ten"}}, "config key 'clean.thresholds.min_chars' expects int"),
        (
            {"clean.channels": {"zh": {"max_top_ngram": {"two": 0.2}}}},
            "clean.channels.zh.max_top_ngram must map n to a fraction",
        ),
        ({"clean.channels": {"zh": [1]}}, "config section clean.channels.zh must be a mapping"),
    ],
)
def test_a_bad_threshold_stops_the_config_load_with_one_line_naming_it(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_thresholds_layer_defaults_overrides_channel_defaults_then_the_channels_own():
    config = load_config(
        None, {"clean.thresholds": {"min_chars": 7}, "clean.channels": {"code": {"max_digit_ratio": 0.9}}}
    )
    default, channels = config.clean.resolved_thresholds()
    assert (default.min_chars, channels["code"].min_chars, channels["math"].min_chars) == (7, 7, 7)
    assert channels["code"].max_digit_ratio == 0.9 and channels["math"].max_digit_ratio == 0.5
    assert channels["code"].max_top_ngram is None  # code keeps its own default: no prose rule


def test_rejected_files_hold_rule_value_and_document(tmp_path):
    junk = [(rule, text) for rule, text in synth.junk_docs(random.Random(2)) if rule != "blocklist"]
    records = [{"id": f"j{i}", "text": text} for i, (_, text) in enumerate(junk)]
    records += [{"id": "good", "text": synth.en_doc(random.Random(3))}]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    report = run_file_stage("clean", config_for(tmp_path), [path], tmp_path / "out", False, clean_file)
    assert report["docs_out"] == 1 and report["channel"]["en_web"]["docs_out"] == 1
    rejected = [
        json.loads(line) for p in (tmp_path / "out" / "rejected").glob("*.jsonl") for line in p.open()
    ]
    assert {r["rule"] for r in rejected} == {rule for rule, _ in junk}
    assert all(r["value"] is not None and r["id"].startswith("j") and r["text"] for r in rejected)
    assert sum(report["rejected"].values()) == len(rejected) == len(junk)


@pytest.fixture
def english_blocklist(tmp_path):
    (tmp_path / "words.txt").write_text("sex\nass\nc++\n彩票\n", encoding="utf-8")
    return clean.Blocklist([tmp_path / "words.txt"])


@pytest.mark.parametrize(
    "text,hits",
    [
        ("Essex class assessment passed", 0),  # substrings of English words are not hits
        ("Sussex bypass compass embassy", 0),
        ("SEX sells; ass.", 2),  # whole words, any case, next to punctuation
        ("look: sex\nass", 2),
        ("看sex视频", 1),  # a Latin keyword inside Chinese text (no spaces) still counts
        ("c++ and c++17", 2),  # a keyword edge that is a symbol needs no word boundary
    ],
)
def test_latin_keywords_match_whole_words_only(english_blocklist, text, hits):
    assert english_blocklist.hits(text) == hits


@pytest.mark.parametrize("text,hits", [("买彩票吗", 1), ("彩票彩票", 2), ("体育彩票中心", 1)])
def test_cjk_keywords_match_as_substrings(english_blocklist, text, hits):
    assert english_blocklist.hits(text) == hits


def test_english_prose_with_keyword_substrings_is_kept(tmp_path):
    (tmp_path / "words.txt").write_text("sex\nass\n", encoding="utf-8")
    cleaner = build_cleaner(config_for(tmp_path, **{"clean.blocklists": [str(tmp_path / "words.txt")]}))
    text = "The Essex class assessment passed on Monday, and the team went home early to rest well."
    assert verdict(cleaner, text) == (True, None, None)
    assert verdict(cleaner, text + " Sex ads everywhere.")[:2] == (False, "blocklist")


def test_rejected_and_malformed_outputs_hold_no_pii(tmp_path):
    good = synth.en_doc(random.Random(3))
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"id": "short", "text": "电话 13812345678"}, {"id": "good", "text": good}])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"text": "mail zhang.san@example.com, call 13912345678" broken\n')
    report = run_file_stage("clean", config_for(tmp_path), [path], tmp_path / "out", False, clean_file)
    rejected = (tmp_path / "out" / "rejected" / "too_short.jsonl").read_text(encoding="utf-8")
    assert json.loads(rejected)["text"] == "电话 <PHONE>"
    malformed = json.loads((tmp_path / "out" / "rejected" / "malformed.jsonl").read_text(encoding="utf-8"))
    assert malformed["reason"] == "invalid_json"
    assert "zhang.san" not in malformed["raw"] and "13912345678" not in malformed["raw"]
    assert "<EMAIL>" in malformed["raw"] and "<PHONE>" in malformed["raw"]
    assert report["pii_in_rejected"] == {"phone": 2, "email": 1}
    assert report["malformed_lines"] == 1 and report["docs_out"] == 1


def test_desensitize_off_leaves_rejected_text_as_written(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "short", "text": "电话 13812345678"}])
    config = config_for(tmp_path, **{"clean.desensitize": False})
    run_file_stage("clean", config, [path], tmp_path / "out", False, clean_file)
    rejected = (tmp_path / "out" / "rejected" / "too_short.jsonl").read_text(encoding="utf-8")
    assert json.loads(rejected)["text"] == "电话 13812345678"


@pytest.mark.parametrize(
    "overrides,text,rule,value",
    [
        ({"max_chars": 50}, "a sentence of plain words " * 3, "too_long", 78),
        ({"min_zh_ratio": 0.5}, "这是中文 and these are English words here", "zh_ratio", round(4 / 31, 4)),
        (
            {"min_en_ratio": 0.5},
            "这是一段比较长的中文文本，里面只有少量的 English 单词而已。",
            "en_ratio",
            round(7 / 32, 4),
        ),
        ({"min_alpha_ratio": 0.5}, "+= -> :: || && ... abc == !! ?? ##", "alpha_ratio", round(3 / 24, 4)),
    ],
)
def test_length_and_script_ratio_rules(overrides, text, rule, value):
    thresholds = thresholds_from({"max_digit_ratio": None, "max_symbol_ratio": None, **overrides}, "test")
    assert filters.check(text, thresholds) == (False, rule, value)
    relaxed = thresholds_from({k: None for k in overrides}, "test", thresholds)
    assert filters.check(text, relaxed)[1] != rule  # the rule, not another one, made the verdict


def test_a_custom_text_field_is_read_and_written_back(tmp_path):
    good = synth.en_doc(random.Random(4))
    records = [{"id": "g", "body": good, "text": "other field"}, {"id": "s", "body": "short"}]
    records.append({"id": "no-body", "text": good})
    path = write_jsonl(tmp_path / "in.jsonl", records)
    config = config_for(tmp_path, text_field="body")
    report = run_file_stage("clean", config, [path], tmp_path / "out", False, clean_file)
    assert (report["docs_in"], report["docs_out"], report["malformed_lines"]) == (2, 1, 1)
    [part] = (tmp_path / "out").glob("part-*.jsonl")
    kept = json.loads(part.read_text(encoding="utf-8"))
    assert kept["body"] == good and kept["text"] == "other field"  # other keys ride along untouched
    short = json.loads((tmp_path / "out" / "rejected" / "too_short.jsonl").read_text(encoding="utf-8"))
    assert short["body"] == "short" and short["rule"] == "too_short"
    malformed = json.loads((tmp_path / "out" / "rejected" / "malformed.jsonl").read_text(encoding="utf-8"))
    assert malformed["reason"] == "missing_text"
