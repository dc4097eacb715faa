"""fastText, as the quality scorer uses it: one text format for training and scoring, and prediction
that works with any numpy.

fastText reads one example per line, so a document's whitespace runs (newlines included) become one
space, the same in `train-scorer` and when `label.scorer: {kind: fasttext}` scores. Prediction calls the
binding's ``model.f.predict`` (a list of (probability, label) pairs) rather than ``model.predict``, whose
single-line path calls ``np.array(..., copy=False)`` and fails with numpy >= 2 in fasttext-wheel 0.9.2.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_patches.errors import ConfigError

POSITIVE, NEGATIVE = "__label__hq", "__label__lq"
_SPACE = re.compile(r"\s+")
INSTALL_HINT = "fastText is missing: pip install '.[label]' (fasttext-community, or fasttext-wheel)"


def example_text(text: str) -> str:
    """A document as one fastText line: whitespace runs collapsed to one space."""
    return _SPACE.sub(" ", text).strip()


def import_fasttext() -> Any:
    try:
        import fasttext
    except ImportError as err:
        raise ConfigError(INSTALL_HINT) from err
    return fasttext


def load_model(path: Path | str) -> Any:
    return import_fasttext().load_model(str(path))


def label_probability(model: Any, text: str, label: str) -> float:
    """The probability of `label` for one document (0.0 when the model does not know the label)."""
    pairs = model.f.predict(example_text(text), -1, 0.0, "strict")
    return next((float(prob) for prob, name in pairs if name == label), 0.0)


def scores(model: Any, texts: Sequence[str], label: str) -> list[float]:
    return [label_probability(model, text, label) for text in texts]
