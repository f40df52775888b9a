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


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("She has 18 left.\n#### 18", "Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", 1.0),
        ("So the answer is $x = 3$.", "3", 1.0),
        (r"\boxed{[1,2)}", "[1, 2)", 1.0),
        (r"\boxed{\{2, 1\}}", r"\{1,2\}", 1.0),
        (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1.0),
        ("I think it is 7", "7", 0.0),
    ],
)
def test_math_takes_boxed_then_gsm8k_then_the_answer_is(completion, gold, expected):
    from grpo.rewards.math import math_answer

    assert math_answer(completion, {"answer": gold}) == expected
