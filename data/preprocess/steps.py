"""The clean and label steps, built from the config, and their file-level task functions."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

from . import pii
from .clean import Blocklist
from .config import PipelineConfig
from .document import Document
from .engines.local import Progress
from .filters import Cleaner
from .label import Scorer, infer_channels, load_scorer
from .quality import QualityFilter
from .report import Stats
from .stage import FileTask, Step, StepResult, map_file


def build_cleaner(config: PipelineConfig) -> Cleaner:
    section = config.clean
    paths = [config.path(p) for p in section.blocklists]
    blocklist = Blocklist([p for p in paths if p is not None]) if paths else None
    return Cleaner(*section.resolved_thresholds(), blocklist, config.label, section.resolved_rules(), config)


def clean_step(config: PipelineConfig) -> Step:
    cleaner = build_cleaner(config)
    types = pii.selected_types(config.clean.pii_types) if config.clean.desensitize else ()

    def step(batch: Sequence[Document], stats: Stats) -> list[StepResult]:
        results: list[StepResult] = []
        channels, verdicts = cleaner.judge(batch)  # the rules measure the text as written
        for doc, channel, (keep, rule, value) in zip(batch, channels, verdicts, strict=True):
            if types:  # rejected documents too: rejected/<rule>.jsonl must not leak what we mask
                doc.text, counts = pii.desensitize(doc.text, types)
                section = "pii" if keep else "pii_in_rejected"
                for kind, n in counts.items():
                    stats[f"{section}/{kind}"] += n
            results.append((keep, rule, value, channel))
        return results

    return step


@functools.lru_cache(maxsize=4)
def _cached_scorer(spec_json: str, base_dir: str) -> Scorer:
    spec = json.loads(spec_json)
    if spec.get("kind") != "python" and "path" in spec:
        spec["path"] = str(Path(base_dir) / spec["path"])
    return load_scorer(spec)


def label_step(config: PipelineConfig, quality: QualityFilter | None = None) -> Step:
    """Channel, then score; `quality` (the `quality` section's rules) drops by score."""
    spec = config.label.scorer
    scorer = _cached_scorer(json.dumps(spec, sort_keys=True), str(config.base_dir)) if spec else None

    def step(batch: Sequence[Document], stats: Stats) -> list[StepResult]:
        for doc, channel in zip(batch, infer_channels(batch, config.label), strict=True):
            doc.channel = channel
        if scorer is not None:
            for doc, score in zip(batch, scorer([d.text for d in batch]), strict=True):
                doc.quality = float(score)
            stats["scored"] += len(batch)
        channels = [doc.channel or config.label.default_channel for doc in batch]
        if quality is None:
            return [(True, None, None, channel) for channel in channels]
        return [
            (*quality.filter(doc, channel), channel) for doc, channel in zip(batch, channels, strict=True)
        ]

    return step


def clean_file(task: FileTask, progress: Progress) -> Stats:
    return map_file(task, progress, clean_step)


def label_file(task: FileTask, progress: Progress) -> Stats:
    """Label one task; with `quality` rules, drop by score (the cuts of a `keep_fraction`: CutTask)."""
    config = task.config
    if not config.quality.enabled:
        return map_file(task, progress, label_step)
    quality = QualityFilter(config.quality, getattr(task, "cuts", {}), task.index)
    return map_file(task, progress, functools.partial(label_step, quality=quality))
