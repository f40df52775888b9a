"""Answer extraction from free-form completions."""

from __future__ import annotations

import re

BOXED = "\\boxed{"


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces balanced; None if there is none or it never closes.

    >>> last_boxed(r"so \\boxed{\\frac{1}{2}} and \\boxed{3}")
    '3'
    >>> last_boxed(r"\\boxed{\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    """
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(BOXED)
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
    return None


_GSM8K = re.compile(r"####\s*([^\n]+)")
_THE_ANSWER_IS = re.compile(
    r"the (?:final )?answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.\s*)?$", re.IGNORECASE | re.MULTILINE
)


def final_answer(text: str) -> str | None:
    """The final answer of a completion: the last `\\boxed{}`, else GSM8K's `#### N`, else the
    last "the answer is X" sentence.

    >>> final_answer("so #### 1,234")
    '1,234'
    >>> final_answer("Thus the answer is 7.")
    '7'
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_GSM8K, _THE_ANSWER_IS):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    return None


def gold_answer(gold: str) -> str:
    """Gold answers come as MATH LaTeX, plain numbers, or a GSM8K solution ending in `#### N`."""
    found = _GSM8K.findall(gold)
    return found[-1].strip() if found else gold.strip()
