"""Answer extraction of bench/accuracy on responses shaped like real model outputs."""

from __future__ import annotations

from fractions import Fraction

import pytest

from bench.accuracy.answers import (
    extract_boxed,
    extract_choice,
    extract_math_answer,
    extract_number,
    math_equal,
    normalize_math,
    normalize_number,
    numbers_equal,
    score,
)

# -- \boxed{} -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the answer is $\\boxed{42}$.", "42"),
        ("First \\boxed{1}, then corrected: \\boxed{2}", "2"),
        ("$\\boxed{\\frac{14}{3}}$", "\\frac{14}{3}"),
        (
            "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.",
            "\\left( 3, \\frac{\\pi}{2} \\right)",
        ),
        ("The area is \\boxed{ 6\\sqrt{3} } square units.", "6\\sqrt{3}"),
        ("\\fbox{17}", "17"),
        ("the result is \\boxed 7 and done", "7"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ],
)
def test_extract_boxed_returns_last_balanced_content(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    ["no box here, the answer is 5", "\\boxed{unclosed {brace}", "\\boxed"],
)
def test_extract_boxed_gives_none_without_a_complete_box(text):
    assert extract_boxed(text) is None


# -- numbers (GSM8K) ------------------------------------------------------------------

GSM8K_RESPONSES = [
    # (response, gold, correct?)
    (
        "Janet's ducks lay 16 eggs. She uses 3 + 4 = 7. 16 - 7 = 9 eggs are sold.\n"
        "9 * $2 = $18.\nThe answer is 18.",
        "18",
        True,
    ),
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18", True),
    ("Step 1: 2 + 3 = 5\nStep 2: 5 * 4 = 20\nSo she has 20 apples left.", "20", True),
    ("The total cost is $1,250.00.", "1250", True),
    ("The final answer is: $\\boxed{70,000}$", "70000", True),
    ("He loses 3 pounds a week, so the change is -3 pounds.", "-3", True),
    ("Answer: 0.5 hours", "0.5", True),
    ("They need 12 boxes. Each box costs $5. The answer is 60 dollars.", "60", True),
    ("The answer is 17.", "18", False),
    ("I am not sure how to solve this problem.", "18", False),
    (
        "3 + 4 = 7 and then 7 * 2 = 14. The answer is 14.\n\nNote: 2023 rules.",
        "14",
        True,
    ),
    ("So the percentage is 25%.", "25", True),
    ("Total = 5 + 6 = 11\n#### 11\nExtra text 99", "11", True),
]


@pytest.mark.parametrize(("response", "gold", "correct"), GSM8K_RESPONSES)
def test_gsm8k_scoring_matches_a_careful_reader(response, gold, correct):
    predicted, ok = score("number", response, gold)
    assert ok is correct, (predicted, gold)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234", Fraction(1234)),
        ("$18", Fraction(18)),
        ("18.", Fraction(18)),
        ("-10", Fraction(-10)),
        ("3/4", Fraction(3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("-\\dfrac{1}{2}", Fraction(-1, 2)),
        ("50%", Fraction(50)),
        ("12 dollars", Fraction(12)),
        ("x = 5", Fraction(5)),
        ("0.25", Fraction(1, 4)),
        ("\\text{12}", Fraction(12)),
    ],
)
def test_normalize_number_reads_exact_values(text, value):
    assert normalize_number(text) == value


@pytest.mark.parametrize("text", ["", "abc", "\\sqrt{2}", "(1, 2)", "1/0", "3x+1", "-"])
def test_normalize_number_rejects_non_numbers(text):
    assert normalize_number(text) is None


def test_extract_number_prefers_marked_answer_over_later_numbers():
    text = "#### 42\n(I checked with 3 examples and 7 cases.)"
    assert extract_number(text) == "42"


def test_numbers_equal_ignores_formatting_but_not_value():
    assert numbers_equal("1,000.00", "1000")
    assert not numbers_equal("1,001", "1000")
    assert not numbers_equal(None, "1000")


# -- MATH -----------------------------------------------------------------------------

MATH_PAIRS = [
    # (model answer, gold from the solution's last \boxed{}, equal?)
    ("\\dfrac{14}{3}", "\\frac{14}{3}", True),
    ("\\frac14", "\\frac{1}{4}", True),
    ("0.25", "\\frac{1}{4}", True),
    ("1/4", "\\frac{1}{4}", True),
    ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("90^\\circ", "90", True),
    ("90^{\\circ}", "90", True),
    ("x = 5", "5", True),
    ("\\text{Evelyn}", "\\text{Evelyn}", True),
    ("Evelyn", "\\text{Evelyn}", True),
    ("10\\%", "10", True),
    ("\\$32", "32", True),
    ("5\\text{ cm}", "5", True),
    ("2\\sqrt3", "2\\sqrt{3}", True),
    ("1,000", "1000", True),
    ("5.00", "5", True),
    ("p - q", "p-q", True),
    ("\\frac{14}{3}", "\\frac{13}{3}", False),
    ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    ("2\\sqrt{2}", "2\\sqrt{3}", False),
    ("-5", "5", False),
    ("q-p", "p-q", False),
]


@pytest.mark.parametrize(("predicted", "gold", "equal"), MATH_PAIRS)
def test_math_equal_on_equivalent_and_different_answers(predicted, gold, equal):
    assert math_equal(predicted, gold) is equal, (
        normalize_math(predicted),
        normalize_math(gold),
    )


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (
            "We have $r = \\sqrt{0^2 + 3^2} = 3$. The angle is $\\frac{\\pi}{2}$, so "
            "the point is $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.",
            "\\left( 3, \\frac{\\pi}{2} \\right)",
        ),
        ("Final Answer: The final answer is $24$. I hope it is correct.", "24"),
        ("The final answer is \\frac{1}{2}.", "\\frac{1}{2}"),
        ("I cannot determine the answer.", None),
    ],
)
def test_extract_math_answer_finds_the_boxed_or_stated_answer(response, expected):
    assert extract_math_answer(response) == expected


def test_math_scoring_of_whole_responses():
    gold = "\\frac{14}{3}"
    assert score("math", "Thus $x = \\boxed{\\dfrac{14}{3}}$.", gold)[1]
    assert not score("math", "Thus $x = \\boxed{\\dfrac{14}{5}}$.", gold)[1]
    assert not score("math", "Thus x is fourteen thirds.", gold)[1]


# -- multiple choice (ARC) ------------------------------------------------------------

OPTIONS = [
    "Sunlight is the source of energy for nearly all ecosystems.",
    "Most ecosystems are found on land instead of in water.",
    "Carbon dioxide is more available than other gases.",
    "The producers in all ecosystems are plants.",
]

CHOICE_RESPONSES = [
    ("A", "A"),
    ("B.", "B"),
    ("(C)", "C"),
    ("**D**", "D"),
    ("D) The producers in all ecosystems are plants.", "D"),
    ("The answer is B.", "B"),
    ("The correct answer is (C) Carbon dioxide is more available.", "C"),
    ("Answer: D", "D"),
    ("answer: a", None),  # lower-case letters are words, not options
    ("I think the best choice is option C because ...", "C"),
    ("Sunlight is the source of energy for nearly all ecosystems.", "A"),
    ("Photosynthesis converts light.\n\nA\n", "A"),
    ("$\\boxed{B}$", "B"),
    ("The answer is E.", None),  # only four options
    ("I don't know.", None),
    ("A and B are both plausible, as is C.", "A"),  # leads with a letter
    ("Energy flows through food webs in many ways.", None),
]


@pytest.mark.parametrize(("response", "expected"), CHOICE_RESPONSES)
def test_extract_choice_on_typical_responses(response, expected):
    assert extract_choice(response, len(OPTIONS), OPTIONS) == expected


def test_extract_choice_accepts_a_fifth_option_only_when_it_exists():
    assert extract_choice("The answer is E.", 5) == "E"
    assert extract_choice("The answer is E.", 4) is None


def test_choice_scoring_compares_letters():
    assert score("choice", "The answer is A.", "A", OPTIONS) == ("A", True)
    assert score("choice", "The answer is B.", "A", OPTIONS) == ("B", False)
    assert score("choice", "no idea", "A", OPTIONS) == (None, False)


def test_score_rejects_unknown_kinds_and_missing_options():
    with pytest.raises(ValueError, match="unknown answer kind"):
        score("essay", "text", "gold")
    with pytest.raises(ValueError, match="option texts"):
        score("choice", "A", "A")
