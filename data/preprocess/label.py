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

from megatron_patches.errors import ConfigError

from .document import Document

_HAN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z\u00C0-\u024F]")
# One match per line at most (every branch starts at the line start), so findall counts lines.
_CODE_LINE = re.compile(
    r"^(?:[ \t]*(?:def |class |import |from \S+ import |#include|#define|public |private |static |func |fn "
    r"|function |return\b|elif |else:|try:|except\b|raise |const |let |var |package |@\w+)"
    r"|.*[;{}][ \t]*$|[ \t]*[}\])]+[;,]?[ \t]*$|[ \t]*#(?!#* )| {4,}\S|\t+\S|.*:[ \t]*$)",
    re.MULTILINE,
)
_MD_LINE = re.compile(r"^(?:#{1,6} \S|[-*+] \S|\d+\. \S|\|.*\||```|> \S)", re.MULTILINE)
_NONEMPTY_LINE = re.compile(r"^[ \t]*\S", re.MULTILINE)
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
    sample = text[:4000]
    han = len(_HAN.findall(sample))
    latin = len(_LATIN.findall(sample))
    if han + latin == 0:
        return "unknown"
    return "zh" if han >= 0.3 * (han + latin) else "en"


def content_kind(text: str, config: LabelConfig) -> str | None:
    """'code', 'markdown' or 'math' when the text's lines say so, else None (prose)."""
    head = text[:20000]
    lines = len(_NONEMPTY_LINE.findall(head))
    if lines >= 3:
        if len(_CODE_LINE.findall(head)) >= config.code_line_ratio * lines:
            return "code"
        markdown = _MD_LINE.findall(head)
        if len(markdown) >= config.markdown_line_ratio * lines and any(m.startswith("#") for m in markdown):
            return "markdown"
    if len(_MATH.findall(text[:20000])) * 1000 >= config.math_per_kchar * max(1, min(len(text), 20000)):
        return "math"
    return None


def infer_channel(doc: Document, config: LabelConfig) -> str:
    if doc.channel and not config.overwrite:
        return doc.channel
    if doc.source:
        for pattern, channel in config.sources.items():
            if fnmatch.fnmatchcase(doc.source, pattern):
                return channel
    kind = content_kind(doc.text, config)
    if kind is not None:
        return kind
    return config.language_channels.get(language(doc.text), config.default_channel)


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
    try:
        import fasttext
    except ImportError as err:
        raise ConfigError("label.scorer.kind fasttext needs `pip install fasttext-wheel`") from err
    model = fasttext.load_model(path)

    def score(texts: Sequence[str]) -> list[float]:
        # fastText predicts on one line; its probabilities cover every label when k=-1.
        labels, probs = model.predict([t.replace("\n", " ") for t in texts], k=-1)
        return [
            float(dict(zip(ls, ps, strict=True)).get(label, 0.0))
            for ls, ps in zip(labels, probs, strict=True)
        ]

    return score


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
