"""Benchmark items: parsing, counted skips, and each rewrite's documented form."""

from dataclasses import replace

import pytest

from tools.eval.bench import SAMPLE
from tools.eval.rewrites import NONE_CORRECT, Item, Prompted, Skip, parse_item, read_items, rewrite

SINGLE = Item("even", "Which number is even?", ("three", "four", "five", "seven"), (1,))
MULTI = Item("primes", "Which are prime?", ("2", "4", "7", "9"), (0, 2))
SHUFFLED = ("seven", "five", "four", "three")  # SINGLE's options in seed 0's order for its id


def test_answer_forms_all_name_the_same_options():
    base = '{"id": "q", "question": "Q?", "options": %s, "answer": %s}'
    as_list = '["w", "x", "y", "z"]'
    as_dict = '{"A": "w", "B": "x", "C": "y", "D": "z"}'
    for options, answer in [(as_list, '"C"'), (as_list, "2"), (as_dict, '"c"'), (as_list, '["C"]')]:
        assert parse_item(base % (options, answer), 1) == Item("q", "Q?", ("w", "x", "y", "z"), (2,))
    assert parse_item(base % (as_list, '"DA"'), 1).answers == (0, 3)
    assert parse_item(base % (as_list, '["B", "D"]'), 1).answers == (1, 3)


def test_the_sample_file_parses_whole():
    items, skipped = read_items(SAMPLE)
    assert skipped == []
    assert len(items) == 8
    assert [i.id for i in items if len(i.answers) > 1] == ["primes", "mammals"]


def test_original_keeps_letters():
    assert rewrite(SINGLE, "original") == [
        Prompted(
            "even", "Which number is even?", ("three", "four", "five", "seven"), ("A", "B", "C", "D"), "B"
        )
    ]
    assert rewrite(MULTI, "original")[0].answer == "AC"


def test_permuted_shuffles_the_options_by_seed_and_id():
    assert rewrite(SINGLE, "permuted") == [
        Prompted("even", "Which number is even?", SHUFFLED, tuple("ABCD"), "C")
    ]
    assert rewrite(MULTI, "permuted")[0].options == ("4", "2", "7", "9")
    assert rewrite(MULTI, "permuted")[0].answer == "BC"
    assert rewrite(SINGLE, "permuted", seed=1)[0].options == ("three", "seven", "four", "five")
    assert rewrite(replace(SINGLE, id="odd"), "permuted")[0].options != SHUFFLED


def test_open_shows_options_as_context_and_expects_the_text():
    assert rewrite(SINGLE, "open") == [Prompted("even", "Which number is even?", SHUFFLED, None, "four")]


def test_none_correct_replaces_the_correct_option_after_shuffling():
    assert rewrite(SINGLE, "none-correct") == [
        Prompted(
            "even", "Which number is even?", ("seven", "five", NONE_CORRECT, "three"), tuple("ABCD"), "C"
        )
    ]
    assert rewrite(SINGLE, "none-correct", "以上都不对")[0].options[2] == "以上都不对"


def test_zh_labels_replace_letters():
    assert rewrite(SINGLE, "zh-labels") == [
        Prompted("even", "Which number is even?", SHUFFLED, ("一", "二", "三", "四"), "三")
    ]
    assert rewrite(MULTI, "zh-labels")[0].answer == "二三"


def test_single_answer_splits_a_multi_answer_item_per_correct_option():
    assert rewrite(MULTI, "single-answer") == [
        Prompted("primes#1", "Which are prime?", ("4", "9", "2"), ("A", "B", "C"), "C"),
        Prompted("primes#2", "Which are prime?", ("4", "9", "7"), ("A", "B", "C"), "C"),
    ]
    assert rewrite(SINGLE, "single-answer") == rewrite(SINGLE, "permuted")


@pytest.mark.parametrize("kind", ["open", "none-correct"])
def test_rewrites_that_need_one_answer_skip_multi_answer_items(kind):
    with pytest.raises(Skip, match=f"the {kind} rewrite needs a single-answer item"):
        rewrite(MULTI, kind)


def test_malformed_lines_are_counted_with_their_reason(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(
        '{"question": "Q?", "options": ["a", "b"], "answer": "A"}\n'
        "not json\n"
        '{"question": "Q?", "options": ["a", "b"], "answer": "E"}\n'
        '{"question": "Q?", "options": "a b", "answer": "A"}\n'
        '{"options": ["a", "b"], "answer": "A"}\n'
        '{"question": "Q?", "options": ["a", ""], "answer": "A"}\n'
        '{"question": "Q?", "options": ["a"], "answer": "A"}\n'
    )
    items, skipped = read_items(path)
    assert [i.id for i in items] == ["1"]
    assert skipped == [
        "b.jsonl:2: not JSON (Expecting value)",
        "b.jsonl:3: answer 'E' does not name distinct options among ['A', 'B']",
        "b.jsonl:4: no 'options' list or mapping",
        "b.jsonl:5: no 'question' string",
        "b.jsonl:6: every option must be a non-empty string",
        "b.jsonl:7: 1 options; 2 to 10 are supported",
    ]


def test_none_correct_examples_alternate_none_as_answer_and_as_distractor():
    from tools.eval.rewrites import rewrite_example

    assert rewrite_example(SINGLE, "none-correct", 0) == rewrite(SINGLE, "none-correct")
    assert rewrite_example(SINGLE, "none-correct", 1) == [
        Prompted("even", "Which number is even?", (NONE_CORRECT, "five", "four", "three"), tuple("ABCD"), "C")
    ]
    assert rewrite_example(SINGLE, "zh-labels", 1) == rewrite(SINGLE, "zh-labels")
