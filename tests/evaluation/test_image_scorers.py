"""The official scorers' edge cases, as pure functions."""
import pytest

from evaluation.choice_scoring import lmms_eval_leading_letter, lmms_eval_mcq_letter, vlmevalkit_choice
from evaluation.mathvista_scoring import normalize_extracted, official_extraction, rule_extraction
from evaluation.mmmu_scoring import MMMUChoiceRng, open_correct, parse_multi_choice, parse_open

OPTIONS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("(C)", "C"), ("B. dog", "B"),
    ("The answer is D", "D"),  # the letter among the last five tokens
    ("D is what I would pick among these options", None),  # the letter too early, no option text
    ("it is a dog", "B"),  # option text, answer short enough
    ("Cannot determine the answer", "Z"),  # a refusal: VLMEvalKit's "no option"
    ("A or B", None),  # two letters
    ("I believe the correct answer is **C** because birds fly over the water in the picture", "C"),
])
def test_vlmevalkit_choice(prediction, letter):
    assert vlmevalkit_choice(prediction, OPTIONS) == letter


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("(C) bird", "C"), ("The answer is A.", "A"), ("I think it's (B), not (C)", "C"), ("", ""),
])
def test_lmms_eval_mcq_letter(prediction, letter):
    assert lmms_eval_mcq_letter(prediction) == letter


def test_lmms_eval_ai2d_takes_only_a_leading_letter():
    assert lmms_eval_leading_letter("C. bird") == "C" and lmms_eval_leading_letter("c") == "C"
    assert lmms_eval_leading_letter("the bird") == "THE BIRD"


def test_mmmu_multiple_choice_parser():
    rng = MMMUChoiceRng()
    assert parse_multi_choice("(B)", OPTIONS, rng) == ("B", True)
    assert parse_multi_choice("B or maybe D", OPTIONS, rng) == ("D", True)  # the last candidate wins
    assert parse_multi_choice("My final guess here is that it is a fish.", OPTIONS, rng) == ("D", True)  # option text
    letter, parsed = parse_multi_choice("no idea", OPTIONS, rng)
    assert not parsed and letter in OPTIONS


def test_mmmu_open_answers_numbers_units_and_several_ground_truths():
    assert open_correct(["24/7", "3.429"], parse_open("The ratio is 3.43."))
    assert open_correct("5 cm", parse_open("So the length is 5 cm"))  # an answer with a unit
    assert open_correct("1,000", parse_open("the answer is 1000"))
    assert not open_correct("2", parse_open("the answer is 3"))
    assert sorted(parse_open("x")) == [" x", "x "]  # one-character strings are padded against trivial matches


def test_mathvista_floats_with_precision_units_and_lists():
    assert normalize_extracted("0.130", None, "free_form", "float", 2) == "0.13"
    assert normalize_extracted("1.456", None, "free_form", "float", 1.0) == "1.5"  # the parquet's float precision
    assert normalize_extracted("7.0", None, "free_form", "integer", None) == "7"
    assert normalize_extracted("[1, 2]", None, "free_form", "list", None) == "[1, 2]"
    assert normalize_extracted("", ["3/11", "8/11"], "multi_choice", "text", None) == "3/11"  # closest choice
    assert normalize_extracted("(B) 8/11", ["3/11", "8/11"], "multi_choice", "text", None) == "8/11"
    assert official_extraction('The answer is "12".', "free_form", "integer", None) == "12"
    assert official_extraction("12 apples", "free_form", "integer", None) is None  # the official code asks GPT-4 next
    assert rule_extraction("It costs $1,250.50 in total (Unit: $)", "free_form", "float", None) == "1250.50"
    assert rule_extraction("The lists are [1] and [2, 3]", "free_form", "list", None) == "[2, 3]"
    assert rule_extraction("Sorry, I cannot tell.", "free_form", "integer", None) == ""  # a refusal: unparsed
