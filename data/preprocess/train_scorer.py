"""train-scorer: a fastText quality classifier from positive and negative JSONL.

Per task (a file, or a byte range of one): its documents as fastText lines (`__label__hq` for the
positive inputs, `__label__lq` for the negative ones; `fasttext_model.example_text`) in the stage's
temporary directory. Global step, on this machine: the lines joined in input order, fastText trained
with `train_scorer.seed` on one thread (fastText's threads race on the shared weights, so more than one
gives a different model each run; with one the model file is the same bytes every run and on either
engine), `scorer.bin` written and the training text removed. Use it as
`label.scorer: {kind: fasttext, path: <out>/scorer.bin}`; its score is the probability of `__label__hq`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from megatron_patches.errors import ConfigError

from .config import PipelineConfig
from .engines.local import Progress
from .fasttext_model import NEGATIVE, POSITIVE, example_text, import_fasttext
from .jsonl import RejectWriter
from .report import Stats
from .skeleton import Stage, run_stage_object
from .stage import FileTask, document_batches, file_tasks

EXAMPLES_DIR = ".examples"  # per-task training lines, removed once the model is trained
MODEL_FILE = "scorer.bin"


@dataclass(frozen=True)
class ExampleTask(FileTask):
    label: str = POSITIVE


def examples_task(task: ExampleTask, progress: Progress) -> Stats:
    """One task's documents as labelled fastText lines, in `<tmp>/.examples/<tag>.txt`."""
    stats, kind = Stats(), "positive" if task.label == POSITIVE else "negative"
    rejects = RejectWriter(task.out / "rejected", task.tag)
    (task.out / EXAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    try:
        with open(task.out / EXAMPLES_DIR / f"{task.tag}.txt", "w", encoding="utf-8") as handle:
            for batch in document_batches(task, stats, rejects, progress):
                for doc in batch:
                    stats["docs_in"] += 1
                    line = example_text(doc.text)
                    if not line:  # fastText would read the label alone as an example
                        stats["rejected/empty"] += 1
                        record = {"rule": "empty", "value": 0, **doc.to_record(task.config.text_field)}
                        rejects.write("empty", json.dumps(record, ensure_ascii=False))
                        continue
                    handle.write(f"{task.label} {line}\n")
                    stats["docs_out"] += 1
                    stats[f"{kind}/docs"] += 1
    finally:
        rejects.close()
    return stats


def train_model(examples: Path, config: PipelineConfig) -> object:
    t = config.train_scorer
    return import_fasttext().train_supervised(
        str(examples),
        dim=t.dim,
        epoch=t.epoch,
        lr=t.lr,
        wordNgrams=t.word_ngrams,
        minCount=t.min_count,
        bucket=t.bucket,
        seed=t.seed,
        thread=1,  # reproducible: see the module docstring
        verbose=0,
    )


class TrainScorerStage(Stage):
    """Per task: labelled training lines (`examples_task`); global step: fastText trained on them."""

    name = "train-scorer"
    work = staticmethod(examples_task)
    report_inputs = False

    def __init__(self, config: PipelineConfig, out: Path, positive: list[Path], negative: list[Path]):
        super().__init__(config, out)
        self.positive, self.negative = positive, negative

    def prepare(self) -> None:
        both = sorted(set(self.positive) & set(self.negative))
        if both:
            raise ConfigError(f"train-scorer: {both[0]} is both a positive and a negative input")
        import_fasttext()  # a missing package stops the stage before any task runs

    def make_tasks(self, inputs: list[Path], tmp: Path) -> list[FileTask]:
        def make(index: int, *rest: object) -> ExampleTask:
            return ExampleTask(index, *rest, label=POSITIVE if index < len(self.positive) else NEGATIVE)

        return file_tasks(inputs, tmp, self.config, self.name, make=make)

    def finish(self, tmp: Path, tasks: list[FileTask], result: Stats) -> tuple[Stats, dict]:
        if not result["positive/docs"] or not result["negative/docs"]:
            raise ConfigError("train-scorer: needs at least one positive and one negative document")
        examples = tmp / EXAMPLES_DIR / "train.txt"
        with open(examples, "wb") as out:  # in input order: the model depends on the order of examples
            for task in sorted(tasks, key=lambda t: t.tag):
                with open(tmp / EXAMPLES_DIR / f"{task.tag}.txt", "rb") as part:
                    shutil.copyfileobj(part, out)
        model = train_model(examples, self.config)
        _, precision, _ = model.test(str(examples))
        model.save_model(str(tmp / MODEL_FILE))
        shutil.rmtree(tmp / EXAMPLES_DIR)
        return result, {
            "positive_inputs": [str(p) for p in self.positive],
            "negative_inputs": [str(p) for p in self.negative],
            "model": MODEL_FILE,
            "label": POSITIVE,
            "train_precision": round(float(precision), 4),
            "params": {**dataclasses.asdict(self.config.train_scorer), "thread": 1},
        }


def run_train_scorer(
    config: PipelineConfig, positive: list[Path], negative: list[Path], out: Path, overwrite: bool = False
) -> dict:
    stage = TrainScorerStage(config, out, positive, negative)
    return run_stage_object(stage, [*positive, *negative], overwrite)
