"""The benchmarks `grpo eval` knows: where their rows come from, how to prompt, how to score."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from grpo.eval.prompts import lean_prompt, lean_statement, math_prompt


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str
    """`lean` (proofs checked by the Lean verifier) or `math` (answers checked by the math reward)."""
    default_file: str
    """Relative to the data folder (`GRPO_DATA_DIR`, else `../shared/data` beside the project)."""
    id_field: str
    published: str
    """Published results to sit beside ours in the report."""

    def missing_field(self, row: dict) -> str | None:
        """The field `prompt` or `sample` would need and `row` lacks, if any."""
        needed = [("formal_statement",)] if self.kind == "lean" else [("problem", "question"), ("answer",)]
        return next(
            (" or ".join(map(repr, names)) for names in needed if not any(n in row for n in names)), None
        )

    def prompt(self, row: dict, style: str) -> str:
        if self.kind == "lean":
            return lean_prompt(row, style)
        return math_prompt(row.get("problem") or row["question"])

    def sample(self, row: dict) -> dict:
        """What the reward receives."""
        if self.kind == "lean":
            return {
                "formal_statement": lean_statement(row["formal_statement"]),
                "header": row.get("header", ""),
            }
        return {"answer": row["answer"]}


BENCHMARKS = {
    b.name: b
    for b in [
        Benchmark(
            "minif2f",
            "lean",
            "minif2f/minif2f.jsonl",
            "name",
            "DeepSeek-Prover-V1.5-RL, single-pass pass@32 on miniF2F-test: 50.0% (Xin et al., 2024, arXiv:2408.08152); "
            "DeepSeek-Prover-V2-7B, CoT pass@32: 75.6% (Ren et al., 2025, arXiv:2504.21801)",
        ),
        Benchmark(
            "proofnet",
            "lean",
            "proofnet/proofnet.jsonl",
            "name",
            "DeepSeek-Prover-V1.5 reports ProofNet valid/test pass@32 in its Table 2 (Xin et al., 2024, arXiv:2408.08152)",
        ),
        Benchmark("math500", "math", "math500/test.jsonl", "unique_id", "(no reference row)"),
        Benchmark("gsm8k", "math", "gsm8k/test.jsonl", "", "(no reference row)"),
    ]
}


def default_data_dir() -> Path:
    if os.environ.get("GRPO_DATA_DIR"):
        return Path(os.environ["GRPO_DATA_DIR"])
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"
