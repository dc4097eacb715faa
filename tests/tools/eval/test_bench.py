"""Generative benchmark scoring: prompts, answer reading, accuracy; the CLI on a tiny model."""

import json

import pytest

from tests.tiny_hf import build_model
from tests.tools.eval.cli import run_eval
from tools.eval.bench import SAMPLE, build_prompt, extract_answer, run_bench
from tools.eval.rewrites import REWRITES, Prompted, rewrite
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
        assert record["prompt"].startswith("Question: Which number is even?\nOptions: seven / five / four")


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


def _bench_file(path, n_items: int, answers_per_item: int) -> dict[str, tuple[int, ...]]:
    """``n_items`` four-option items, answers spread over every letter; {question: answer indices}."""
    original = {}
    with path.open("w", encoding="utf-8") as f:
        for i in range(n_items):
            answers = tuple(sorted({(i + k) % 4 for k in range(answers_per_item)}))
            original[f"Q{i}?"] = answers
            options = [f"item {i} option {j}" for j in range(4)]
            record = {"question": f"Q{i}?", "options": options, "answer": ["ABCD"[a] for a in answers]}
            f.write(json.dumps(record) + "\n")
    return original


def _memorizer(original: dict[str, tuple[int, ...]]):
    """A model that knows nothing but each item's original answer positions, and answers them in
    whatever labels the prompt shows (the option text at that position when there are none)."""

    def answer(prompt: str) -> str:
        question, *lines = prompt.rsplit("Question: ", 1)[1].splitlines()
        if lines[0].startswith("Options: "):
            return " " + lines[0].removeprefix("Options: ").split(" / ")[original[question][0]] + "\n"
        labels = [line.split(". ", 1)[0] for line in lines[:-1]]
        return " " + "".join(labels[i] for i in original[question]) + "\n"

    return lambda prompts: [answer(p) for p in prompts]


N_ITEMS = 2000


def _within_chance(accuracy: float, chance: float) -> bool:
    # The option orders are a fixed seeded draw, so this is deterministic; 4 binomial standard
    # deviations over N_ITEMS (~0.04 at 1/4) hold for any seed but fail a rewrite that leaves
    # even one item in 19 with its original letter (accuracy 1/4 + 3/4 * 1/19 = 0.29).
    return abs(accuracy - chance) <= 4 * (chance * (1 - chance) / N_ITEMS) ** 0.5


@pytest.mark.parametrize("kind", REWRITES)
def test_a_memorized_answer_letter_scores_chance_under_every_rewrite_but_original(tmp_path, kind):
    original = _bench_file(tmp_path / "bench.jsonl", N_ITEMS, answers_per_item=1)
    result = run_bench(tmp_path / "bench.jsonl", kind, _memorizer(original))
    assert result.scored == N_ITEMS
    if kind == "original":
        assert result.accuracy == 1.0
    else:  # one of four options, placed uniformly at random
        assert _within_chance(result.accuracy, 1 / 4), result.accuracy


@pytest.mark.parametrize("kind", ["permuted", "zh-labels"])
def test_memorized_letters_of_multi_answer_items_score_chance(tmp_path, kind):
    original = _bench_file(tmp_path / "bench.jsonl", N_ITEMS, answers_per_item=2)
    result = run_bench(tmp_path / "bench.jsonl", kind, _memorizer(original))
    assert _within_chance(result.accuracy, 1 / 6), result.accuracy  # two of four: 1 in C(4, 2)


def test_a_file_whose_answers_are_all_a_does_not_reward_always_a(tmp_path):
    items = [
        {"question": f"Q{i}?", "options": [f"{i}-{j}" for j in range(4)], "answer": "A"}
        for i in range(N_ITEMS)
    ]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    for kind in ("permuted", "none-correct", "single-answer"):
        result = run_bench(tmp_path / "bench.jsonl", kind, _echo_first_label)
        assert _within_chance(result.accuracy, 1 / 4), (kind, result.accuracy)


def test_the_seed_draws_the_option_order_and_the_same_seed_repeats_it():
    def prompts(**seed) -> list[str]:
        return [r["prompt"] for r in run_bench(SAMPLE, "permuted", _echo_first_label, **seed).records]

    assert prompts() == prompts(seed=0) != prompts(seed=1)
