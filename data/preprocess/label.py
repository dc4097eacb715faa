"""Channel assignment (source rules, then content heuristics) and the optional quality scorer.

:func:`infer_channel` is pure and is also what `clean` uses to pick per-channel thresholds, so code
and markdown are never judged by the prose rules. A scorer is a model file the user provides
(fastText, a HF sequence classifier directory, or a Python callable); it sets `Document.quality`,
which `dedup` uses to keep the best copy of a near-duplicate cluster.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_patches.errors import ConfigError

from .clean import CHAR_CLASSES, CLASS_TABLE, astral_class, class_counts
from .document import Document

# The script of each BMP code point (0 other, 1 Han or kana, 2 Latin), so that `language` counts
# with one numpy lookup instead of two regex passes.
_SCRIPT = np.zeros(0x10000, dtype=np.uint8)
for _lo, _hi, _script in ((0x3040, 0x30FF, 1), (0x3400, 0x4DBF, 1), (0x4E00, 0x9FFF, 1), (0xF900, 0xFAFF, 1)):
    _SCRIPT[_lo : _hi + 1] = _script
for _lo, _hi in ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F)):
    _SCRIPT[_lo : _hi + 1] = 2
# A code-like line starts like code (matched at the line start: it fails fast on prose) or ends in
# one of _CODE_END before spaces and tabs (a string test: as a regex, `.*[;{}:][ \t]*$` walked every
# character of every line and was the costliest part of the clean stage's channel check).
_CODE_START = re.compile(
    r"[ \t]*(?:def |class |import |from \S+ import |#include|#define|public |private |static |func |fn "
    r"|function |return\b|elif |else:|try:|except\b|raise |const |let |var |package |@\w+)"
    r"|[ \t]*[}\])]+[;,]?[ \t]*$|[ \t]*#(?!#* )| {4,}\S|\t+\S"
)
_CODE_END = (";", "{", "}", ":")
_MD_LINE = re.compile(r"^(?:#{1,6} \S|[-*+] \S|\d+\. \S|\|.*\||```|> \S)", re.MULTILINE)
_MATH = re.compile(r"\$[^$\n]+\$|\\(?:frac|sum|int|sqrt|cdot|alpha|beta|theta|lambda|begin\{equation)")

LANGUAGE_CHANNELS = {"zh": "zh_web", "en": "en_web"}


@dataclass
class LabelConfig:
    sources: dict[str, str] = field(default_factory=dict)  # fnmatch pattern on `source` -> channel
    language_channels: dict[str, str] = field(default_factory=lambda: dict(LANGUAGE_CHANNELS))
    default_channel: str = "other"
    code_line_ratio: float = 0.5  # of non-empty lines
    markdown_line_ratio: float = 0.3
    math_per_kchar: float = 3.0  # LaTeX markers per 1000 characters
    overwrite: bool = False  # re-label documents that already carry a channel
    scorer: dict | None = None  # {kind: fasttext|hf|python, path: ..., label: ...}


def language(text: str) -> str:
    """'zh' if Han characters make up at least 30% of the letters, 'en' if Latin letters dominate."""
    return languages([text])[0]


def languages(texts: Sequence[str]) -> list[str]:
    """:func:`language` of each text (of its first 4000 characters), counted for all in one pass."""
    counts = class_counts([text[:4000] for text in texts], _SCRIPT, 3, None).tolist()
    return [_language(han, latin) for _, han, latin in counts]


# Character class (clean.char_classes) and script of each BMP code point in one table, so that the
# clean step counts both with one numpy pass (:func:`classes_and_languages`) instead of two.
_SCRIPTS = 3
_CLASS_SCRIPT = CLASS_TABLE * _SCRIPTS + _SCRIPT


def _astral_class_script(points: np.ndarray) -> np.ndarray:
    return astral_class(points) * _SCRIPTS  # script 0: `languages` counts none above the BMP


def classes_and_languages(texts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(clean.char_classes of each text as rows, :func:`language` of each), from one numpy pass:
    each text is counted as its first 4000 characters (which `language` reads) and the rest."""
    pieces = [piece for text in texts for piece in (text[:4000], text[4000:])]
    counts = class_counts(pieces, _CLASS_SCRIPT, CHAR_CLASSES * _SCRIPTS, _astral_class_script)
    counts = counts.reshape(len(texts), 2, CHAR_CLASSES, _SCRIPTS)
    scripts = counts[:, 0].sum(axis=1).tolist()  # of the first 4000 characters
    return counts.sum(axis=(1, 3)), [_language(han, latin) for _, han, latin in scripts]


def _language(han: int, latin: int) -> str:
    if han + latin == 0:
        return "unknown"
    return "zh" if han >= 0.3 * (han + latin) else "en"


def line_counts(text: str) -> tuple[int, int]:
    """(non-empty lines, code-like lines) of `text`. A line is non-empty when its first character
    after spaces and tabs is not white space (form feed, CR, ...)."""
    nonempty = code = 0
    for line in text.split("\n"):
        body = line.lstrip(" \t")
        nonempty += bool(body) and not body[0].isspace()
        code += line.rstrip(" \t").endswith(_CODE_END) or _CODE_START.match(line) is not None
    return nonempty, code


def content_kind(text: str, config: LabelConfig) -> str | None:
    """'code', 'markdown' or 'math' when the text's lines say so, else None (prose)."""
    head = text[:20000]
    lines, code = line_counts(head)
    if lines >= 3:
        if code >= config.code_line_ratio * lines:
            return "code"
        markdown = _MD_LINE.findall(head) if "#" in head else []  # needs a heading: skip the scan
        if len(markdown) >= config.markdown_line_ratio * lines and any(m.startswith("#") for m in markdown):
            return "markdown"
    # every marker holds "$" or "\\": without them there is none to count
    markers = len(_MATH.findall(head)) if "$" in head or "\\" in head else 0
    if markers * 1000 >= config.math_per_kchar * max(1, min(len(text), 20000)):
        return "math"
    return None


def infer_channel(doc: Document, config: LabelConfig) -> str:
    return infer_channels([doc], config)[0]


def infer_channels(
    docs: Sequence[Document], config: LabelConfig, langs: Sequence[str] | None = None
) -> list[str]:
    """The channel of each document: its own, a source rule's, its content kind's, else its language's
    (the languages of all such documents counted together, or `langs`, given for all the documents)."""
    channels = [_channel_before_language(doc, config) for doc in docs]
    prose = [i for i, channel in enumerate(channels) if channel is None]
    found = languages([docs[i].text for i in prose]) if langs is None else [langs[i] for i in prose]
    for i, lang in zip(prose, found, strict=True):
        channels[i] = config.language_channels.get(lang, config.default_channel)
    return channels  # type: ignore[return-value]  # every None was replaced


def _channel_before_language(doc: Document, config: LabelConfig) -> str | None:
    if doc.channel and not config.overwrite:
        return doc.channel
    if doc.source:
        for pattern, channel in config.sources.items():
            if fnmatch.fnmatchcase(doc.source, pattern):
                return channel
    return content_kind(doc.text, config)


Scorer = Callable[[Sequence[str]], list[float]]


def load_scorer(spec: dict) -> Scorer:
    """A batch scorer from `{kind, path, label}`; a missing file or package is a ConfigError."""
    kind = spec.get("kind")
    target = str(spec.get("path", ""))
    if kind == "python":
        return _python_scorer(target)
    if not Path(target).exists():
        raise ConfigError(f"label.scorer.path {target!r} does not exist")
    if kind == "fasttext":
        return _fasttext_scorer(target, str(spec.get("label", "__label__hq")))
    if kind == "hf":
        return _hf_scorer(target, int(spec.get("label", 1)), int(spec.get("max_length", 512)))
    raise ConfigError(f"label.scorer.kind must be fasttext, hf or python, got {kind!r}")


def _python_scorer(target: str) -> Scorer:
    module_name, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"label.scorer.path {target!r}: expected 'module:function' ({err})") from err
    return lambda texts: [float(v) for v in fn(list(texts))]


def _fasttext_scorer(path: str, label: str) -> Scorer:
    # the text as train-scorer wrote it, predicted through the binding (any numpy): fasttext_model.py
    from . import fasttext_model

    model = fasttext_model.load_model(path)
    return lambda texts: fasttext_model.scores(model, texts, label)


def _hf_scorer(path: str, label_index: int, max_length: int) -> Scorer:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    if not 0 <= label_index < model.config.num_labels:
        raise ConfigError(f"label.scorer.label {label_index} is not a class of {path}")

    @torch.no_grad()
    def score(texts: Sequence[str]) -> list[float]:
        batch = tokenizer(
            list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        return model(**batch).logits.softmax(-1)[:, label_index].tolist()

    return score
