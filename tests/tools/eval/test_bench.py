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
