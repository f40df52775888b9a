"""Prompts for the benchmarks: DeepSeek-Prover-V1.5 style for Lean, a boxed-answer request for math."""

from __future__ import annotations

LEAN_INSTRUCTIONS = {
    "noncot": "Complete the following Lean 4 code:\n\n```lean4\n",
    "cot": "Complete the following Lean 4 code with explanatory comments preceding each line of code:\n\n```lean4\n",
}
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def lean_statement(formal_statement: str) -> str:
    """The statement the model continues: ProofNet's end in `:=` without `by`; both end in `by\\n`."""
    text = formal_statement.rstrip()
    if text.endswith(":="):
        text += " by"
    return text + "\n"


def lean_prompt(row: dict, style: str = "noncot") -> str:
    """Instruction + header + informal statement (as a doc comment) + formal statement.

    >>> lean_prompt({"header": "import Mathlib\\n", "informal_prefix": "/-- 1=1 -/\\n", "formal_statement": "theorem t : 1 = 1 :="})
    'Complete the following Lean 4 code:\\n\\n```lean4\\nimport Mathlib\\n/-- 1=1 -/\\ntheorem t : 1 = 1 := by\\n'
    """
    return (
        LEAN_INSTRUCTIONS[style]
        + row.get("header", "")
        + row.get("informal_prefix", "")
        + lean_statement(row["formal_statement"])
    )


def math_prompt(question: str) -> str:
    return question.strip() + MATH_SUFFIX
