"""The label stage: channels and scores per task; with a `quality.keep_fraction`, first a score pass
and a cut per channel (its global step, on this machine), then the labelling pass that drops below it.
The rules themselves: `quality.py`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PipelineConfig
from .document import Document
from .engines import map_reduce
from .engines.local import Progress
from .jsonl import read_documents
from .quality import ChannelScores, Cut, cuts_for, make_gid, rank_score
from .report import Stats
from .skeleton import DocumentStage, run_stage_object
from .stage import BATCH, FileTask, cpu_workers
from .steps import label_file, label_step


@dataclass(frozen=True)
class CutTask(FileTask):
    """A label task that knows the cuts of the score pass (`steps.label_file` reads `cuts`)."""

    cuts: dict[str, Cut] = field(default_factory=dict)


def score_task(task: FileTask, progress: Progress) -> ChannelScores:
    """The score pass over one task: (score, position) of every good document, per channel; malformed
    lines are left to the labelling pass, which counts them once."""
    step, scores = label_step(task.config), ChannelScores()
    documents = read_documents(task.path, task.config.text_field, span=task.span)
    batch: list[Document] = []
    for item, nbytes in documents:
        progress.update(1, nbytes)
        if isinstance(item, Document):
            batch.append(item)
        if len(batch) >= BATCH:
            _add_scores(task, step(batch, Stats()), batch, scores)
            batch = []
    if batch:
        _add_scores(task, step(batch, Stats()), batch, scores)
    return scores


def _add_scores(task: FileTask, results: list, batch: list, scores: ChannelScores) -> None:
    by_channel: dict[str, tuple[list[float], list[int]]] = {}
    for doc, (_, _, _, channel) in zip(batch, results, strict=True):
        if task.config.quality.rule_for(channel).keep_fraction is None:
            continue  # only a fraction needs the channel's scores
        values, gids = by_channel.setdefault(channel, ([], []))
        values.append(rank_score(doc.quality))
        gids.append(make_gid(task.index, doc.line))
    for channel, (values, gids) in by_channel.items():
        scores.add(channel, values, gids)


def merge_scores(total: ChannelScores, more: ChannelScores) -> ChannelScores:
    return total.merge(more)


class LabelStage(DocumentStage):
    """Label, score and (with `quality` rules) drop by score; see the module docstring."""

    def __init__(self, config: PipelineConfig, out: Path):
        super().__init__("label", config, out, label_file)
        self.cuts: dict[str, Cut] = {}

    @property
    def needs_cuts(self) -> bool:
        q = self.config.quality
        return any(q.rule_for(c).keep_fraction is not None for c in q.channels) or q.keep_fraction is not None

    def execute(self, tasks: list[FileTask]) -> Any:
        if self.needs_cuts and tasks:
            workers = cpu_workers(self.config.workers)
            scores = map_reduce(
                self.engine, self.config, score_task, tasks, workers, "label: scores", merge_scores
            )
            self.cuts = cuts_for(self.config.quality, scores)
            fields = [f.name for f in dataclasses.fields(FileTask)]
            tasks = [CutTask(**{name: getattr(t, name) for name in fields}, cuts=self.cuts) for t in tasks]
        return super().execute(tasks)

    def finish(self, tmp: Path, tasks: list[FileTask], result: Stats) -> tuple[Stats, dict]:
        stats, extra = super().finish(tmp, tasks, result)
        if not self.config.quality.enabled:
            return stats, extra
        cuts = {c: {"score": cut.score if cut.score > -math.inf else None} for c, cut in self.cuts.items()}
        return stats, {**extra, "quality": {**dataclasses.asdict(self.config.quality), "cuts": cuts}}


def run_label(config: PipelineConfig, inputs: list[Path], out: Path, overwrite: bool = False) -> dict:
    return run_stage_object(LabelStage(config, out), inputs, overwrite)
