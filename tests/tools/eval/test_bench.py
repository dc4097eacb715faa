"""Generative benchmark scoring: prompts, answer reading, accuracy; the CLI on a tiny model."""

import json

import pytest

from tests.tiny_hf import build_model
from tests.tools.eval.cli import run_eval
from tools.eval.bench import SAMPLE, build_prompt, extract_answer, run_bench
from tools.eval.rewrites import Prompted, rewrite
from tools.eval.rewrites import read_items as read_bench

LETTERS = Prompted("q", "Q?", ("w", "x", "y", "z"), tuple("ABCD"), "B")
OPEN = Prompted("q", "Q?", ("red", "green"), None, "green")


def test_few_shot_prompt_text():
    shot = Prompted("s", "Which number is even?", ("three", "four"), ("A", "B"), "B")
    assert build_prompt([shot], OPEN) == (
        "Question: Which number is even?\nA. three\nB. four\nAnswer: B\n\n"
        "Question: Q?\nOptions: red / green\nAnswer:"
    )


@pytest.mark.parametrize(
    ("generation", "answer"),
    [(" B", "B"), (" B. x\nQuestion: C", "B"), ("B,D", "BD"), (" DB", "BD"), (" Because", ""), ("\nB", "")],
)
def test_labels_are_read_from_the_first_line(generation, answer):
    assert extract_answer(generation, LETTERS) == answer


def test_open_answers_compare_normalized_text():
    assert extract_answer(" Green.\nnext", OPEN) == "green"
    assert extract_answer(" greenish", OPEN) == "greenish"


def test_accuracy_counts_exactly_the_items_answered_right():
    items, _ = read_bench(SAMPLE)
    expected = {p.question: p.answer for item in items for p in rewrite(item, "zh-labels")}
    right = {"Which number is even?", "Which of these numbers are prime?"}

    def answer(prompt: str) -> str:
        question = prompt.rsplit("Question: ", 1)[1].split("\n", 1)[0]
        return f" {expected[question]}\n" if question in right else " 四\n"

    result = run_bench(SAMPLE, "zh-labels", lambda prompts: [answer(p) for p in prompts], shots=2)
    # The first two items are the examples; of the other six only "primes" is answered right
    # (no item's answer is 四).
    assert (result.scored, result.correct) == (6, 1)
    assert [r["id"] for r in result.records if r["correct"]] == ["primes"]
    assert all(r["prompt"].count("Question:") == 3 for r in result.records)


def test_cli_scores_the_sample_and_counts_skips(tmp_path):
    model = build_model(tmp_path / "llama")
    data = tmp_path / "bench.jsonl"
    data.write_text(SAMPLE.read_text() + "this line is broken\n")
    out = tmp_path / "records.jsonl"
    args = ["--hf", str(model), "--data", str(data), "--rewrite", "open", "--shots", "1"]
    proc = run_eval("bench", *args, "--max-new-tokens", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert f"({sum(r['correct'] for r in records)}/5 scored, 3 skipped)" in proc.stdout
    assert "skipped bench.jsonl:9: not JSON" in proc.stdout
    assert "skipped bench.jsonl item primes: the open rewrite needs a single-answer item" in proc.stdout
    assert [r["id"] for r in records] == ["capital_fr", "boil", "capital_zh", "planet", "colour"]
    for record in records:
        assert "\n" not in record["generation"]
        assert record["prompt"].startswith("Question: Which number is even?\nOptions: three / four")


def _echo_first_label(prompts: list[str]) -> list[str]:
    return [" A\n" for _ in prompts]


def test_single_answer_examples_never_share_an_original_item_with_the_scored_one():
    # The 4th example item, "primes", expands into primes#1 and primes#2: only primes#1 fits in
    # --shots 4, and primes#2 must not be scored after it.
    result = run_bench(SAMPLE, "single-answer", _echo_first_label, shots=4)
    assert [r["id"] for r in result.records] == ["capital_zh", "mammals#1", "mammals#2", "planet", "colour"]
    for record in result.records:
        assert record["shot_ids"] == ["even", "capital_fr", "boil", "primes#1"]
        assert record["id"].split("#")[0] not in {s.split("#")[0] for s in record["shot_ids"]}
    dev = run_bench(SAMPLE, "single-answer", _echo_first_label, shots=4, dev=SAMPLE)
    assert [r["id"] for r in dev.records][:4] == ["even", "capital_fr", "boil", "primes#1"]  # all scored


def _answer_text(block: str) -> str:
    """The text of the option a solved block's answer label names."""
    label = block.rsplit("Answer: ", 1)[1]
    return block.split(f"\n{label}. ", 1)[1].split("\n", 1)[0]


def test_none_correct_examples_do_not_all_answer_none():
    from tools.eval.rewrites import NONE_CORRECT

    result = run_bench(SAMPLE, "none-correct", _echo_first_label, shots=2)
    for record in result.records:
        *shots, question = record["prompt"].split("\n\n")
        assert [_answer_text(shot) for shot in shots] == [
            NONE_CORRECT,
            "Paris",
        ]  # answer once, distractor once
        assert all(NONE_CORRECT in shot for shot in shots)
        assert _answer_text(f"{question} {record['expected']}") == NONE_CORRECT  # scored items unchanged
