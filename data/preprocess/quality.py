"""Dropping documents by their quality score, per channel, in the label stage.

`label.scorer` (e.g. the fastText model of `train-scorer`) sets each document's `quality`; the
`quality` config section then drops, per channel, documents scored below `min_score`, or all but the
`keep_fraction` best. A fraction needs every score of the channel first, so the label stage then runs
twice (`label_stage.py`): a score pass whose per-task scores merge into one cut per channel
(:func:`top_cut`), then the labelling pass, which drops what falls below the cut. Documents rank by
score, ties by input position (file, line): the cut and what it keeps are the same on every engine and
for every range size. Drops go to `rejected/quality.jsonl` with the score as `value`. The kept
documents carry their score, so `dedup` keeps the highest-scored member of a duplicate cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import QualityConfig, QualityRule
from .dedup.lsh import make_gid
from .document import Document

RULE = "quality"
Verdict = tuple[bool, str | None, float | None]
_KEEP: Verdict = (True, None, None)


def rank_score(score: float | None) -> float:
    """A score as it ranks: no score or NaN ranks below every number."""
    return -math.inf if score is None or math.isnan(score) else float(score)


@dataclass(frozen=True)
class Cut:
    """The last document a `keep_fraction` keeps: its score and position (gid)."""

    score: float
    gid: int

    def keeps(self, score: float, gid: int) -> bool:
        return score > self.score or (score == self.score and gid <= self.gid)


class ChannelScores:
    """Scores and positions (gids) per channel, from the score pass; merges in any order."""

    def __init__(self) -> None:
        self.parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def add(self, channel: str, scores: list[float], gids: list[int]) -> None:
        arrays = (np.asarray(scores, dtype=np.float64), np.asarray(gids, dtype=np.int64))
        self.parts.setdefault(channel, []).append(arrays)

    def merge(self, other: ChannelScores) -> ChannelScores:
        for channel, parts in other.parts.items():
            self.parts.setdefault(channel, []).extend(parts)
        return self

    def arrays(self, channel: str) -> tuple[np.ndarray, np.ndarray]:
        parts = self.parts.get(channel, [])
        if not parts:
            return np.zeros(0, np.float64), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def top_cut(scores: np.ndarray, gids: np.ndarray, fraction: float) -> Cut | None:
    """The cut keeping the ceil(fraction * n) best (highest score, then earliest gid); None if n = 0."""
    if scores.size == 0:
        return None
    keep = max(1, math.ceil(round(fraction * scores.size, 9)))  # round: 0.7 * 10 is 7.000000000000001
    order = np.lexsort((gids, -scores))
    last = order[keep - 1]
    return Cut(float(scores[last]), int(gids[last]))


def cuts_for(config: QualityConfig, scores: ChannelScores) -> dict[str, Cut]:
    """Every channel's cut, for the channels whose rule is a `keep_fraction`."""
    cuts = {}
    for channel in sorted(scores.parts):
        fraction = config.rule_for(channel).keep_fraction
        cut = top_cut(*scores.arrays(channel), fraction) if fraction is not None else None
        if cut is not None:
            cuts[channel] = cut
    return cuts


class QualityFilter:
    """`filter(doc, channel) -> verdict` for the documents of one input file, once scored."""

    name = RULE

    def __init__(self, config: QualityConfig, cuts: dict[str, Cut], file_index: int):
        self.config, self.cuts, self.file_index = config, cuts, file_index
        self._rules: dict[str, QualityRule] = {}

    def filter(self, doc: Document, channel: str) -> Verdict:
        rule = self._rules.get(channel) or self._rules.setdefault(channel, self.config.rule_for(channel))
        score = rank_score(doc.quality)
        value = None if score == -math.inf else score  # rejected/quality.jsonl: JSON has no NaN
        if rule.min_score is not None and score < rule.min_score:
            return False, RULE, value
        cut = self.cuts.get(channel) if rule.keep_fraction is not None else None
        if cut is not None and not cut.keeps(score, make_gid(self.file_index, doc.line)):
            return False, RULE, value
        return _KEEP
