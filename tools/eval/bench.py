"""``python -m tools.eval bench``: rewritten multiple-choice items, scored generatively.

Each scored item is shown after ``--shots`` solved examples (the first items of
``--dev`` or, without it, of the data file, which are then not scored). Examples
are taken by original item before a rewrite expands it, so no form of a scored
item is among its examples; ``none-correct`` examples alternate "none" as the
answer and as a distractor (``rewrites.rewrite_example``)::

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
import re
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_patches import paths
from megatron_patches.errors import ConfigError
from tools.eval.rewrites import NONE_CORRECT, Item, Prompted, Skip, read_items, rewrite, rewrite_example

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

    def add(self, item: Prompted, prompt: str, generation: str, shot_ids: list[str]) -> None:
        """Score one generation and keep its record."""
        predicted, expected = extract_answer(generation, item), expected_answer(item)
        self.scored += 1
        self.correct += predicted == expected
        self.records.append(
            {
                "id": item.id,
                "shot_ids": shot_ids,
                "prompt": prompt,
                "generation": generation,
                "predicted": predicted,
                "expected": expected,
                "correct": predicted == expected,
            }
        )


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


def expand(
    items: list[Item], kind: str, none_text: str, skipped: list[str], source: Path, seed: int = 0
) -> list[Prompted]:
    """The prompted forms of ``items`` in order; items the rewrite cannot use go to ``skipped``."""
    prompted = []
    for item in items:
        try:
            prompted += rewrite(item, kind, none_text, seed)
        except Skip as reason:
            skipped.append(f"{source.name} item {item.id}: {reason}")
    return prompted


def choose_examples(
    items: list[Item], kind: str, shots: int, none_text: str, skipped: list[str], source: Path, seed: int = 0
) -> tuple[list[Prompted], list[Item]]:
    """(``shots`` solved examples, the items after those used): chosen by original item, before
    expansion, so no rewrite of an example's item (``single-answer``'s ``id#k``) is ever scored."""
    examples: list[Prompted] = []
    used = 0
    for item in items:
        if len(examples) >= shots:
            break
        used += 1
        try:
            examples += rewrite_example(item, kind, len(examples), none_text, seed)
        except Skip as reason:
            skipped.append(f"{source.name} item {item.id}: {reason}")
    if len(examples) < shots:
        raise ConfigError(f"{source} has {len(examples)} usable items; --shots {shots} needs more")
    return examples[:shots], items[used:]


def run_bench(
    path: Path,
    kind: str,
    generate: Callable[[list[str]], list[str]],
    shots: int = 0,
    dev: Path | None = None,
    none_text: str = NONE_CORRECT,
    seed: int = 0,
) -> BenchResult:
    """Rewrite, prompt, generate (``generate(prompts) -> continuations``) and score; ``seed`` draws
    the option order of every rewrite but ``original``."""
    if shots < 0:
        raise ConfigError(f"--shots must be >= 0, got {shots}")
    result = BenchResult(kind)
    items, bad_lines = read_items(path)
    result.skipped += bad_lines
    if dev:
        shot_items, _ = choose_examples(read_items(dev)[0], kind, shots, none_text, [], dev, seed)
    else:
        shot_items, items = choose_examples(items, kind, shots, none_text, result.skipped, path, seed)
    scored = expand(items, kind, none_text, result.skipped, path, seed)
    if not scored:
        raise ConfigError(f"{path} has no usable items left to score after {shots} examples")
    prompts = [build_prompt(shot_items, item) for item in scored]
    for item, prompt, generation in zip(scored, prompts, generate(prompts), strict=True):
        result.add(item, prompt, generation, [shot.id for shot in shot_items])
    return result


def write_records(result: BenchResult, path: Path) -> None:
    with paths.atomic_file(path) as temp, temp.open("w", encoding="utf-8") as f:
        for record in result.records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def summary(result: BenchResult) -> str:
    lines = [
        f"rewrite {result.rewrite}: accuracy {result.accuracy:.4f} "
        f"({result.correct}/{result.scored} scored, {len(result.skipped)} skipped)"
    ]
    lines += [f"  skipped {reason}" for reason in result.skipped]
    return "\n".join(lines)


def as_dict(result: BenchResult) -> dict:
    return {**asdict(result), "accuracy": result.accuracy}
