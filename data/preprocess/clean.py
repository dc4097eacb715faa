"""What the clean rules measure: character-class ratios, URL share, and blocklist keyword hits.

The rules themselves are filters (`filters.py`); each measures one number and compares it with a
threshold; a rejected document is written to `rejected/<rule>.jsonl` with the measured value so a
person can check what a rule drops. Code, markdown and math get their own defaults
(`thresholds.CHANNEL_DEFAULTS`): prose rules such as the symbol ratio or line repetition would wash
them out. Any threshold set to null in the config is off.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_patches.errors import ConfigError

_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'\u3000-\u303f\uff00-\uffef]+", re.IGNORECASE)


@dataclass
class TextStats:
    chars: int
    zh_ratio: float
    en_ratio: float
    alpha_ratio: float
    digit_ratio: float
    symbol_ratio: float
    url_ratio: float


SYMBOL, SPACE, DIGIT, HAN, LATIN, LETTER = range(6)
CHAR_CLASSES = 6


def _class_table() -> np.ndarray:
    """Character class of every BMP code point, looked up with numpy instead of per-char Python."""
    table = np.full(0x10000, SYMBOL, dtype=np.uint8)
    for cp in range(0x10000):
        ch = chr(cp)
        if ch.isspace():
            table[cp] = SPACE
        elif ch.isdecimal():
            table[cp] = DIGIT
        elif ch.isalpha():
            table[cp] = LETTER
    for lo, hi in ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF)):
        table[lo : hi + 1][table[lo : hi + 1] == LETTER] = HAN
    for lo, hi in ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)):
        table[lo : hi + 1][table[lo : hi + 1] == LETTER] = LATIN
    return table


_CLASS = CLASS_TABLE = _class_table()


def class_counts(
    texts: Sequence[str], table: np.ndarray, classes: int, astral: Callable[[np.ndarray], np.ndarray] | None
) -> np.ndarray:
    """Per text (rows), how many of its characters fall in each class of `table`, a lookup of the BMP;
    `astral` classes the code points above it (None: they take table[0xFFFF]). One numpy pass over
    all the texts, as numpy's fixed cost per call, paid per document, would outweigh the counting."""
    points = np.frombuffer("".join(texts).encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    if points.size and points.max() > 0xFFFF:
        found = table[np.minimum(points, 0xFFFF)]
        if astral is not None:
            above = points > 0xFFFF
            found[above] = astral(points[above])
    else:
        found = table[points]
    slots = np.repeat(np.arange(0, len(texts) * classes, classes, dtype=np.int32), [len(t) for t in texts])
    slots += found  # the text's first slot plus the class
    return np.bincount(slots, minlength=len(texts) * classes).reshape(len(texts), classes)


def astral_class(points: np.ndarray) -> np.ndarray:
    """CJK extension B and beyond are Han; emoji and the rest are symbols."""
    return np.where((points >= 0x20000) & (points <= 0x3FFFF), HAN, SYMBOL)


def char_classes(text: str) -> np.ndarray:
    """Counts per class (SYMBOL, SPACE, DIGIT, HAN, LATIN, LETTER) of the characters of `text`."""
    return class_counts([text], _CLASS, CHAR_CLASSES, astral_class)[0]


def measure(text: str) -> TextStats:
    return measure_many([text])[0]


def measure_many(texts: Sequence[str]) -> list[TextStats]:
    """The :class:`TextStats` of each text, the character classes of all counted together."""
    counts = class_counts(texts, _CLASS, CHAR_CLASSES, astral_class).tolist()
    return [text_stats(text, text_counts) for text, text_counts in zip(texts, counts, strict=True)]


def text_stats(text: str, counts: list[int]) -> TextStats:
    """The :class:`TextStats` of `text`, whose :func:`char_classes` are `counts`."""
    nonspace = max(1, len(text) - counts[SPACE])
    letters = counts[HAN] + counts[LATIN] + counts[LETTER]
    has_url = "http" in text or "www." in text or "WWW." in text
    url_chars = sum(len(m) for m in _URL.findall(text)) if has_url else 0
    return TextStats(
        chars=len(text),
        zh_ratio=counts[HAN] / nonspace,
        en_ratio=counts[LATIN] / nonspace,
        alpha_ratio=letters / nonspace,
        digit_ratio=counts[DIGIT] / nonspace,
        symbol_ratio=counts[SYMBOL] / nonspace,
        url_ratio=url_chars / max(1, len(text)),
    )


# Scripts written without spaces between words: a keyword in them can only be found as a substring.
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_UNSPACED_CHAR = re.compile(f"[{_UNSPACED}]")
# A keyword edge that is a letter or digit of a spaced script (Latin, Cyrillic, ...) must be a word
# edge: "sex" must not hit "Essex", "ass" not "class". A CJK neighbour counts as a word edge.
_WORD_START = f"(?:(?<!\\w)|(?<=[{_UNSPACED}]))"
_WORD_END = f"(?:(?!\\w)|(?=[{_UNSPACED}]))"


def _is_spaced_word_char(ch: str) -> bool:
    return (ch.isalnum() or ch == "_") and not _UNSPACED_CHAR.match(ch)


def keyword_pattern(keyword: str) -> str:
    """Regex for one lower-case keyword: word boundaries on its spaced-script edges only."""
    start = _WORD_START if _is_spaced_word_char(keyword[0]) else ""
    end = _WORD_END if _is_spaced_word_char(keyword[-1]) else ""
    return f"{start}{re.escape(keyword)}{end}"


class Blocklist:
    """Keywords from plain files (one per line, '#' comments); matching is case-insensitive.

    Latin-script (and other space-delimited) keywords match whole words only; CJK keywords match as
    substrings, since those scripts put no spaces between words."""

    def __init__(self, paths: list[Path]):
        words: set[str] = set()
        for path in paths:
            if not path.is_file():
                raise ConfigError(f"clean.blocklists: {path} is not a file")
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    words.add(line.lower())
        longest_first = sorted(words, key=lambda w: (-len(w), w))
        self.pattern = re.compile("|".join(map(keyword_pattern, longest_first))) if words else None

    def hits(self, text: str) -> int:
        return len(self.pattern.findall(text.lower())) if self.pattern else 0
