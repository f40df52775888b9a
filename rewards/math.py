"""Math answer rewards: the completion's final answer against the gold answer, by math-verify.

Equivalence (fractions, radicals, expressions, equations such as `x = 3` against `3`, sets,
intervals, tuples, matrices) is math-verify's, which parses LaTeX into sympy. We extract the answer
ourselves (`grpo.rewards.extract`), so what counts as "the answer" is explicit:
- `math`: the last `\\boxed{}`, else GSM8K's `#### N`, else "the answer is X";
- `math_boxed`: the last `\\boxed{}` only (an unboxed answer scores 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from grpo.rewards.extract import final_answer, gold_answer, last_boxed
from math_verify import parse, verify

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


def _score(answer: str | None, sample: Mapping[str, Any]) -> float | None:
    gold = sample.get("answer")
    if gold is None:
        return None
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    return 1.0 if equivalent(answer, gold_answer(str(gold))) else 0.0


def math_answer(completion: str, sample: Mapping[str, Any]) -> float | None:
    """1.0 if the final answer equals `sample["answer"]`, 0.0 otherwise, None without a gold.

    >>> math_answer("The answer is 12.", {"answer": "Natalia sold 12 clips.\\n#### 12"})
    1.0
    """
    return _score(final_answer(completion), sample)


def boxed_math(completion: str, sample: Mapping[str, Any]) -> float | None:
    """Like `math_answer`, but only a `\\boxed{}` answer counts.

    >>> boxed_math(r"7+5 = 12. \\boxed{12}", {"answer": "12"})
    1.0
    >>> boxed_math("7+5 = 12.", {"answer": "12"})
    0.0
    """
    return _score(last_boxed(completion), sample)


# the sample field each scores against: a run refuses data where no row has it (`grpo.data`)
math_answer.sample_fields = boxed_math.sample_fields = ("answer",)  # type: ignore[attr-defined]
