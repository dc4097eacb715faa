"""Multiple-choice items and the rewrites that stop memorized answer letters from helping.

An item (one JSONL line) is ``{"id": ..., "question": str, "options": [str, ...]
or {"A": str, ...}, "answer": "B" | "AC" | ["A", "C"] | 1}``; ``id`` defaults to the
line number, an int answer is a 0-based option index. Malformed lines are
counted and skipped with their reason, never guessed at.

Each rewrite turns an :class:`Item` into zero or more :class:`Prompted` items
(the form the prompt shows and the answer expected). Every rewrite but
``original`` first puts the options in a seeded random order (:func:`permuted`),
uniform over all orders: the letter (or position) a correct option lands on is
independent of the one it had, so a model that memorized the original answer
letters, or a file whose answers are all "A", scores what guessing scores:

- ``original``: options labelled A, B, C, ...; answer the label(s), e.g. ``B`` or ``AC``.
- ``permuted``: as ``original``, options shuffled; the baseline the other rewrites
  compare with (same seed, same order), as each changes one thing more.
- ``open``: the options are context without labels; the answer is the correct
  option's text. Multi-answer items are skipped.
- ``none-correct``: the correct option's text is replaced by "none of the others
  are correct"; the answer is that option's label. Multi-answer items are skipped.
  As solved few-shot examples (:func:`rewrite_example`) every second item instead
  keeps its correct option and has its last wrong option replaced by the "none"
  text: were "none" the answer of every example, the examples would teach "pick
  none" and the rewrite would test nothing.
- ``zh-labels``: labels 一, 二, 三, 四, ... instead of A, B, C, D.
- ``single-answer``: a multi-answer item becomes one item per correct option,
  the other correct options removed (ids ``<id>#1``, ``<id>#2``, ...), each shuffled
  on its own; a single-answer item is shuffled like ``permuted``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_patches.errors import ConfigError

LATIN = "ABCDEFGHIJ"
CHINESE = "一二三四五六七八九十"
NONE_CORRECT = "none of the others are correct"
REWRITES = ("original", "permuted", "open", "none-correct", "zh-labels", "single-answer")


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    options: tuple[str, ...]
    answers: tuple[int, ...]  # 0-based indices of the correct options, sorted


@dataclass(frozen=True)
class Prompted:
    id: str
    question: str
    options: tuple[str, ...]
    labels: tuple[str, ...] | None  # None: options shown unlabelled, answer is text
    answer: str  # the expected answer: label(s) in option order, or the correct option's text


class Skip(Exception):
    """An item this rewrite (or the reader) cannot use; the message is the reason."""


def read_items(path: Path) -> tuple[list[Item], list[str]]:
    """(items, skip reasons) of a benchmark JSONL file."""
    if not path.is_file():
        raise ConfigError(f"benchmark file {path} does not exist")
    items, skipped = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(parse_item(line, number))
        except Skip as reason:
            skipped.append(f"{path.name}:{number}: {reason}")
    return items, skipped


def parse_item(line: str, number: int) -> Item:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as err:
        raise Skip(f"not JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise Skip("not a JSON object")
    question, options = raw.get("question"), raw.get("options")
    if not isinstance(question, str) or not question.strip():
        raise Skip("no 'question' string")
    keys, texts = _options(options)
    answers = _answers(raw.get("answer"), keys)
    return Item(str(raw.get("id", number)), question.strip(), texts, answers)


def _options(options) -> tuple[list[str], tuple[str, ...]]:
    if isinstance(options, dict):
        keys, texts = [str(k).strip().upper() for k in options], list(options.values())
    elif isinstance(options, list):
        keys, texts = list(LATIN[: len(options)]), options
    else:
        raise Skip("no 'options' list or mapping")
    if not 2 <= len(texts) <= len(LATIN):
        raise Skip(f"{len(texts)} options; 2 to {len(LATIN)} are supported")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise Skip("every option must be a non-empty string")
    return keys, tuple(t.strip() for t in texts)


def _answers(answer, keys: list[str]) -> tuple[int, ...]:
    if isinstance(answer, int) and not isinstance(answer, bool):
        picked = [answer] if 0 <= answer < len(keys) else None
    elif isinstance(answer, str):
        picked = [keys.index(c) if c in keys else None for c in answer.strip().upper()]
    elif isinstance(answer, list) and all(isinstance(a, str) for a in answer):
        picked = [keys.index(a.strip().upper()) if a.strip().upper() in keys else None for a in answer]
    else:
        picked = None
    if not picked or None in picked or len(set(picked)) != len(picked):
        raise Skip(f"answer {answer!r} does not name distinct options among {keys}")
    return tuple(sorted(picked))


def rewrite(item: Item, kind: str, none_text: str = NONE_CORRECT, seed: int = 0) -> list[Prompted]:
    """The prompted form(s) of ``item`` under rewrite ``kind``; raises :class:`Skip`."""
    if kind not in REWRITES:
        raise ConfigError(f"unknown rewrite {kind!r}; known: {list(REWRITES)}")
    if kind == "original":
        return [_labelled(item, LATIN)]
    if kind == "single-answer":
        return [_labelled(permuted(piece, seed), LATIN) for piece in _one_answer_each(item)]
    shuffled = permuted(item, seed)
    if kind in ("permuted", "zh-labels"):
        return [_labelled(shuffled, CHINESE if kind == "zh-labels" else LATIN)]
    if len(item.answers) > 1:
        raise Skip(f"the {kind} rewrite needs a single-answer item")
    if kind == "open":
        return [Prompted(item.id, item.question, shuffled.options, None, item.options[item.answers[0]])]
    options = list(shuffled.options)
    options[shuffled.answers[0]] = none_text
    return [_labelled(replace(shuffled, options=tuple(options)), LATIN)]


def rewrite_example(
    item: Item, kind: str, position: int, none_text: str = NONE_CORRECT, seed: int = 0
) -> list[Prompted]:
    """The form(s) of ``item`` as the ``position``-th solved few-shot example: as :func:`rewrite`,
    except that ``none-correct`` examples at odd positions show "none" as a wrong option."""
    if kind == "none-correct" and position % 2 == 1 and len(item.answers) == 1:
        return [_labelled(permuted(_none_as_distractor(item, none_text), seed), LATIN)]
    return rewrite(item, kind, none_text, seed)


def permuted(item: Item, seed: int) -> Item:
    """``item`` with its options in a random order drawn from ``seed`` and the item's id: the same
    order on every run and machine, and uniform over all orders (a correct option keeps its letter
    only as often as chance puts it there, so an old letter tells nothing about the new one)."""
    order = list(range(len(item.options)))
    random.Random(f"{seed}:{item.id}").shuffle(order)
    answers = tuple(sorted(order.index(a) for a in item.answers))
    return replace(item, options=tuple(item.options[i] for i in order), answers=answers)


def _none_as_distractor(item: Item, none_text: str) -> Item:
    """``item`` with its last wrong option replaced by ``none_text`` (the answer stays)."""
    options = list(item.options)
    wrong = [i for i in range(len(options)) if i not in item.answers]
    options[wrong[-1]] = none_text
    return replace(item, options=tuple(options))


def _labelled(item: Item, alphabet: str) -> Prompted:
    labels = tuple(alphabet[: len(item.options)])
    answer = "".join(labels[i] for i in item.answers)
    return Prompted(item.id, item.question, item.options, labels, answer)


def _one_answer_each(item: Item) -> list[Item]:
    """``item`` itself if it has one answer, else one item per correct option (:func:`_keep_one`)."""
    if len(item.answers) == 1:
        return [item]
    return [_keep_one(item, keep, k) for k, keep in enumerate(item.answers, 1)]


def _keep_one(item: Item, keep: int, k: int) -> Item:
    """``item`` with every correct option but ``keep`` removed."""
    kept = [i for i in range(len(item.options)) if i == keep or i not in item.answers]
    return Item(f"{item.id}#{k}", item.question, tuple(item.options[i] for i in kept), (kept.index(keep),))
