import pytest

from grpo.rewards.extract import last_boxed
from grpo.rewards.math import boxed_math


def test_last_boxed_handles_nested_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"


def test_last_boxed_of_an_unclosed_box_is_none():
    assert last_boxed(r"\boxed{\frac{1}{2}") is None
    assert last_boxed("no box here") is None


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        (r"so \boxed{17}", "17", 1.0),
        (r"so \boxed{-12}", "-12", 1.0),
        (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"so \boxed{\dfrac{3}{6}}", r"\frac{1}{2}", 1.0),
        (r"so \boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
        (r"so \boxed{18}", "17", 0.0),
        ("7+5 = 12.", "12", 0.0),
    ],
)
def test_boxed_math_compares_for_mathematical_equality(completion, gold, expected):
    assert boxed_math(completion, {"answer": gold}) == expected


def test_boxed_math_is_not_applicable_without_a_gold_answer():
    assert boxed_math(r"\boxed{1}", {}) is None


def test_an_absurdly_long_boxed_answer_scores_zero_without_parsing():
    assert boxed_math("\\boxed{" + "9" * 5000 + "}", {"answer": "9"}) == 0.0
