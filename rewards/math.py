"""Math answer reward: the last `\\boxed{}` answer against the gold answer, by math-verify.

Equivalence (fractions, radicals, expressions, sets, intervals...) is math-verify's, which parses
LaTeX into sympy; we only extract the boxed answer ourselves so that an unboxed answer never scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from math_verify import parse, verify

from grpo.rewards.extract import last_boxed

MAX_ANSWER_CHARS = 1000  # longer "answers" are garbage; sympy on them can run for hours


def _as_latex(text: str) -> str:
    return f"${text}$"


def equivalent(answer: str, gold: str) -> bool:
    """True if two LaTeX answers are mathematically equal (`\\frac{1}{2}` vs `0.5`)."""
    gold_parsed = parse(_as_latex(gold))
    answer_parsed = parse(_as_latex(answer))
    if not gold_parsed or not answer_parsed:
        return answer.strip() == gold.strip()
    return bool(verify(gold_parsed, answer_parsed))


def boxed_math(completion: str, sample: Mapping[str, Any]) -> float | None:
    """1.0 if the last boxed answer equals `sample["answer"]`, 0.0 otherwise, None without a gold.

    >>> boxed_math(r"7+5 = 12. \\boxed{12}", {"answer": "12"})
    1.0
    >>> boxed_math("7+5 = 12.", {"answer": "12"})
    0.0
    """
    gold = sample.get("answer")
    if gold is None:
        return None
    answer = last_boxed(completion)
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    return 1.0 if equivalent(answer, str(gold)) else 0.0
