"""The clean rules run on batches of documents with numpy; a verdict must not depend on the batch, and
the fast measures must equal their plain definitions (the word regex, the code-line regex, Counter)."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from data.demo import synth
from data.preprocess import clean, label, pii, repetition
from data.preprocess.clean import char_classes
from data.preprocess.document import Document
from data.preprocess.label import classes_and_languages, language, line_counts
from data.preprocess.report import Stats
from data.preprocess.steps import build_cleaner, clean_step
from data.preprocess.word_hashes import word_hashes

from .conftest import config_for

# Characters where the word and line rules have edge cases: CJK letters and non-letters in the CJK
# ranges, letters whose lower() grows or depends on context, astral letters and emoji, white space
# that is not a space, digits of other scripts, separators.
EDGE = list("aZ09_ \n\t.-:;{})#@中文・ー々〇½²٣İıßΣσς\r\x0b\x0c\u3000\u2028") + ["𠀀", "😀", "ǅ", "ﬁ"]
EDGE += [
    "def ",
    "class ",
    "import x",
    "from a import",
    "#include",
    "return",
    "returned",
    "    ",
    "else:",
    "## ",
]


def reference_top(words: list[str], n: int) -> float:
    """Gopher's top n-gram fraction, by its definition; ties go to the n-gram with more characters."""
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    if not grams or max(grams.values()) == 1:
        return 0.0
    top = max(grams.values())
    chars = max(sum(map(len, gram)) for gram, count in grams.items() if count == top)
    return min(1.0, top * chars / max(1, sum(map(len, words))))


def reference_duplicate(words: list[str], n: int) -> float:
    """Characters of the words inside an n-gram that occurs more than once, over all characters."""
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    covered = set()
    for i in range(len(words) - n + 1):
        if grams[tuple(words[i : i + n])] > 1:
            covered.update(range(i, i + n))
    return sum(len(words[i]) for i in covered) / max(1, sum(map(len, words)))


def repetitive_texts(rng: random.Random) -> list[str]:
    """Prose with planted repetition of every kind the n-gram rule measures, and plain prose."""
    en, zh = synth.en_doc(rng), synth.zh_doc(rng)
    return [
        en,
        zh,
        " ".join(["buy cheap watches now"] * 60),
        en + " " + " ".join(en.split()[:40]) * 2,  # one long repeated passage: duplicate n-grams
        zh + zh[:200] * 3,
        "中文 text 中文 text " * 20,
        " ".join(rng.choice(("alpha beta", "gamma", "delta epsilon zeta")) for _ in range(200)),
        "",
        "one",
    ]


def test_the_n_gram_measures_equal_their_definitions_for_every_text_of_a_batch():
    texts = repetitive_texts(random.Random(4))
    batch = repetition.NgramBatch.of_texts(texts + texts)  # each text twice: copies must not add up
    everything = batch.everything()
    for n in (1, 2, 3, 5, 10):
        top, duplicate = batch.top_fraction(n, everything), batch.duplicate_fraction(n, everything)
        for i, text in enumerate(texts + texts):
            words = repetition.words(text)
            assert top[i] == reference_top(words, n), (n, text[:40])
            assert duplicate[i] == reference_duplicate(words, n), (n, text[:40])
    for n in (3, 4):  # the bound that lets the rule skip a count is never under the count
        assert (batch.top_fraction_bound(n) >= batch.top_fraction(n, everything)).all()


def test_a_documents_verdict_does_not_depend_on_the_other_documents_of_its_batch(tmp_path):
    rng = random.Random(5)
    texts = repetitive_texts(rng) + [text for _, text in synth.junk_docs(rng)]
    texts += [synth.code_doc(rng, synth.stdlib_sources()), synth.markdown_doc(rng), synth.math_doc(rng)]
    cleaner = build_cleaner(config_for(tmp_path))
    docs = [Document(text=text, id=str(i)) for i, text in enumerate(texts + texts[::-1])]
    channels = [cleaner.channel_of(doc) for doc in docs]
    alone = [cleaner(doc, channel) for doc, channel in zip(docs, channels, strict=True)]
    assert cleaner.verdicts(docs, channels) == alone
    assert {v[1] for v in alone} >= {None, "ngram_repetition", "line_repetition", "url_ratio", "too_short"}


def random_texts(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(EDGE) for _ in range(rng.randint(0, 14))) for _ in range(count)]


def test_numpy_words_are_the_word_regexs_words():
    rng = random.Random(6)
    for _ in range(1500):
        texts = random_texts(rng, rng.randint(1, 4))
        hashes, lengths, sizes = word_hashes(texts)
        expected = [repetition.words(text) for text in texts]
        assert sizes.tolist() == [len(words) for words in expected], texts
        flat = [word for words in expected for word in words]
        assert lengths.tolist() == [len(word) for word in flat], texts
        hash_of: dict[str, int] = {}
        for word, value in zip(flat, hashes.tolist(), strict=True):
            assert hash_of.setdefault(word, value) == value, texts  # equal words, equal hashes
        assert len(set(hash_of.values())) == len(hash_of), texts  # different words, different hashes


# What content_kind counted with before the per-line string test (its definition).
CODE_LINE = re.compile(
    r"^(?:[ \t]*(?:def |class |import |from \S+ import |#include|#define|public |private |static |func |fn "
    r"|function |return\b|elif |else:|try:|except\b|raise |const |let |var |package |@\w+)"
    r"|.*[;{}][ \t]*$|[ \t]*[}\])]+[;,]?[ \t]*$|[ \t]*#(?!#* )| {4,}\S|\t+\S|.*:[ \t]*$)",
    re.MULTILINE,
)
NONEMPTY_LINE = re.compile(r"^[ \t]*\S", re.MULTILINE)


@pytest.mark.parametrize("seed", [7, 8])
def test_code_line_counts_equal_the_line_regexes(seed):
    rng = random.Random(seed)
    for text in random_texts(rng, 5000) + [synth.code_doc(rng, synth.stdlib_sources()) for _ in range(5)]:
        assert line_counts(text) == (len(NONEMPTY_LINE.findall(text)), len(CODE_LINE.findall(text))), text


def pii_texts(rng: random.Random, count: int) -> list[str]:
    """Digits, separators and the other characters of identifiers in random order, and real ones."""
    pieces = list("0123456789 ().-+:@xX٣abcdef中") + ["+86 ", "00", "(010) ", "1.2.3.4", "::", "a@b.cn"]
    pieces += [synth.phone(rng), synth.prc_id(rng), synth.luhn_card(rng), synth.ipv4(rng), synth.ipv6(rng)]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(count)]


def test_pii_hints_skip_only_scans_that_would_mask_nothing(monkeypatch):
    """With every hint forced on, every pattern scans every text: the masked texts and counts agree."""
    texts = pii_texts(random.Random(9), 3000) + [synth.pii_doc(random.Random(i))[0] for i in range(20)]
    hinted = [pii.desensitize(text) for text in texts]
    monkeypatch.setattr(pii._Hints, "__call__", lambda self, name: True)
    monkeypatch.setattr(pii._Hints, "any", lambda self: True)
    assert [pii.desensitize(text) for text in texts] == hinted
    assert sum(counts["phone"] > 0 for _, counts in hinted) > 100  # identifiers were there to mask


def test_pii_scans_nothing_in_a_text_without_an_at_a_colon_or_a_digit(monkeypatch):
    asked: list[str] = []
    monkeypatch.setattr(pii._Hints, "__call__", lambda self, name: asked.append(name) or True)
    text = "Plain prose (no numbers), just words - and 中文，也没有数字。"
    assert pii.desensitize(text) == (text, Counter())
    assert asked == []  # no hint asked, so no pattern scanned
    assert pii.desensitize(text + " 7")[0] == text + " 7" and asked  # a digit: the hints are asked


def test_character_classes_and_languages_of_one_pass_equal_their_definitions():
    rng = random.Random(10)
    texts = random_texts(rng, 300) + ["a" * 4000 + "中" * 5000, "中" * 3999 + "a" * 9000, "𠀀😀x" * 2100]
    classes, langs = classes_and_languages(texts)
    assert classes.tolist() == [char_classes(text).tolist() for text in texts]
    assert langs == [language(text) for text in texts]
    assert langs[-3:-1] == ["en", "zh"]  # the language of the first 4000 characters only


def test_the_clean_step_counts_character_classes_once_per_batch(tmp_path, monkeypatch):
    """The language of a prose document and its ratio rules read one count of its characters."""
    calls: list[int] = []
    count_classes = clean.class_counts

    def counted(*args):
        calls.append(len(args[0]))
        return count_classes(*args)

    monkeypatch.setattr(clean, "class_counts", counted)
    monkeypatch.setattr(label, "class_counts", counted)
    rng = random.Random(11)
    docs = [Document(text=synth.en_doc(rng), id="en"), Document(text=synth.zh_doc(rng), id="zh")]
    results = clean_step(config_for(tmp_path))(docs, Stats())
    assert [(keep, channel) for keep, _, _, channel in results] == [(True, "en_web"), (True, "zh_web")]
    assert len(calls) == 1
