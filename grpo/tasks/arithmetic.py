"""Synthetic multi-operand integer arithmetic: the embedded default task.

A problem is an expression such as `7+3*4-2` (single-digit operands, `+ - *`, usual precedence).
The worked solution reduces it one operation at a time, then states the answer:

    Q: 7+3*4-2
    A: 7+3*4-2 = 7+12-2 = 19-2 = 17. \\boxed{17}

Held-out prompts are disjoint from training prompts by construction: the split of an expression is a
function of its text (a stable hash), so no seed can leak an eval problem into training. Only
expressions of three or more operands are held out: every single operation (`7*8`) stays in training,
so a held-out problem asks for an unseen *composition* of known steps, not for a fact never taught.

For the supervised warm-up, `boxed_fraction` of the solutions end in `\\boxed{N}` and the rest in a
plain `= N.`, like a base model that has not settled on an answer format: the math reward scores only
boxed answers, so the warm-up model starts with low but non-zero accuracy and GRPO has both a format
and an arithmetic signal to learn from.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator

OPERATORS = "+-*"
EVAL_SHARE = 10  # one expression in ten is held out


def prompt_text(expression: str) -> str:
    return f"Q: {expression}\nA: "


def split_of(expression: str) -> str:
    """`eval` for one in `EVAL_SHARE` expressions of three or more operands, else `train`."""
    if len(expression) < 5:  # a single operation such as "7*8"
        return "train"
    return "eval" if zlib.crc32(expression.encode()) % EVAL_SHARE == 0 else "train"


def random_expression(rng: random.Random, min_operands: int = 2, max_operands: int = 3) -> str:
    count = rng.randint(min_operands, max_operands)
    parts = [str(rng.randint(1, 9))]
    for _ in range(count - 1):
        parts += [rng.choice(OPERATORS), str(rng.randint(1, 9))]
    return "".join(parts)


def _render(values: list[int], ops: list[str]) -> str:
    return str(values[0]) + "".join(op + str(v) for op, v in zip(ops, values[1:]))


def reduction_steps(expression: str) -> list[str]:
    """The expression after each single operation: multiplications first, then left to right.

    >>> reduction_steps("7+3*4-2")
    ['7+12-2', '19-2', '17']
    """
    values = [int(v) for v in expression[::2]]
    ops = list(expression[1::2])
    steps = []
    while ops:
        i = ops.index("*") if "*" in ops else 0
        a, op, b = values[i], ops.pop(i), values.pop(i + 1)
        values[i] = a * b if op == "*" else a + b if op == "+" else a - b
        steps.append(_render(values, ops))
    return steps


def solution_text(expression: str, boxed: bool = True) -> str:
    """`7+3*4-2 = 7+12-2 = 19-2 = 17. \\boxed{17}`, or without the box `7+3*4-2 = ... = 17.`"""
    steps = reduction_steps(expression)
    worked = " = ".join([expression, *steps]) + "."
    return f"{worked} \\boxed{{{steps[-1]}}}" if boxed else worked


def problems(split: str, seed: int) -> Iterator[dict]:
    """Endless stream of `{"prompt", "answer", "expression"}` rows of one split."""
    assert split in ("train", "eval"), split
    rng = random.Random(seed)
    while True:
        expression = random_expression(rng)
        if split_of(expression) == split:
            yield {
                "prompt": prompt_text(expression),
                "answer": reduction_steps(expression)[-1],
                "expression": expression,
            }
