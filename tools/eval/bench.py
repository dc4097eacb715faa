"""``python -m tools.eval bench``: rewritten multiple-choice items, scored generatively.

Each scored item is shown after ``--shots`` solved examples (the first items of
``--dev`` or, without it, of the data file, which are then not scored)::

    Question: Which number is even?
    A. three
    B. four
    Answer: B

    Question: ...
    Answer:

The model continues greedily until a newline or ``max_new_tokens``; the
answer is read from that line (the leading run of labels for labelled
rewrites, the whole line for ``open``) and compared with the expected one.
The metric is accuracy over the scored items; items a rewrite cannot use and
malformed lines are counted and listed, not guessed at. See
``tools/eval/rewrites.py`` for the rewrites.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_patches.errors import ConfigError
from tools.eval.rewrites import NONE_CORRECT, Prompted, Skip, read_items, rewrite

SAMPLE = Path(__file__).with_name("sample_bench.jsonl")
PUNCTUATION = string.punctuation + string.whitespace + "。，、：；！？（）"


@dataclass
class BenchResult:
    rewrite: str
    scored: int = 0
    correct: int = 0
    skipped: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.scored if self.scored else float("nan")


def render(item: Prompted, with_answer: bool) -> str:
    lines = [f"Question: {item.question}"]
    if item.labels is None:
        lines.append("Options: " + " / ".join(item.options))
    else:
        lines += [f"{label}. {text}" for label, text in zip(item.labels, item.options, strict=True)]
    lines.append(f"Answer: {item.answer}" if with_answer else "Answer:")
    return "\n".join(lines)


def build_prompt(shots: list[Prompted], item: Prompted) -> str:
    return "\n\n".join([*(render(s, True) for s in shots), render(item, False)])


def first_line(generation: str) -> str:
    return generation.split("\n", 1)[0]


def extract_answer(generation: str, item: Prompted) -> str:
    """The model's answer on its first line: its leading labels, or its text for ``open``."""
    line = first_line(generation).strip()
    if item.labels is None:
        return _normalize(line)
    allowed = "".join(item.labels)
    label = f"[{re.escape(allowed)}]"
    match = re.match(rf"{label}(?:[\s,，、/&]*{label})*(?!\w)", line)
    if not match:
        return ""
    return "".join(sorted({c for c in match.group(0) if c in allowed}, key=allowed.index))


def expected_answer(item: Prompted) -> str:
    return item.answer if item.labels is not None else _normalize(item.answer)


def _normalize(text: str) -> str:
    return " ".join(text.strip(PUNCTUATION).casefold().split())


def prompted_items(path: Path, kind: str, none_text: str, skipped: list[str]) -> list[Prompted]:
    items, bad_lines = read_items(path)
    skipped += bad_lines
    prompted = []
    for item in items:
        try:
            prompted += rewrite(item, kind, none_text)
        except Skip as reason:
            skipped.append(f"{path.name} item {item.id}: {reason}")
    return prompted


def run_bench(
    path: Path,
    kind: str,
    generate: Callable[[list[str]], list[str]],
    shots: int = 0,
    dev: Path | None = None,
    none_text: str = NONE_CORRECT,
) -> BenchResult:
    """Rewrite, prompt, generate (``generate(prompts) -> continuations``) and score."""
    if shots < 0:
        raise ConfigError(f"--shots must be >= 0, got {shots}")
    result = BenchResult(kind)
    items = prompted_items(path, kind, none_text, result.skipped)
    examples = prompted_items(dev, kind, none_text, []) if dev else items
    if len(examples) < shots + (0 if dev else 1):
        raise ConfigError(f"{dev or path} has {len(examples)} usable items; --shots {shots} needs more")
    shot_items = examples[:shots]
    scored = items if dev else items[shots:]
    prompts = [build_prompt(shot_items, item) for item in scored]
    for item, prompt, generation in zip(scored, prompts, generate(prompts), strict=True):
        predicted, expected = extract_answer(generation, item), expected_answer(item)
        result.scored += 1
        result.correct += predicted == expected
        result.records.append(
            {
                "id": item.id,
                "prompt": prompt,
                "generation": generation,
                "predicted": predicted,
                "expected": expected,
                "correct": predicted == expected,
            }
        )
    return result


def write_records(result: BenchResult, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in result.records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def summary(result: BenchResult) -> str:
    lines = [
        f"rewrite {result.rewrite}: accuracy {result.accuracy:.4f} "
        f"({result.correct}/{result.scored} scored, {len(result.skipped)} skipped)"
    ]
    lines += [f"  skipped {reason}" for reason in result.skipped]
    return "\n".join(lines)


def as_dict(result: BenchResult) -> dict:
    return {**asdict(result), "accuracy": result.accuracy}
