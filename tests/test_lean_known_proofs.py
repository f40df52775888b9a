"""The 29 known proofs against a real Lean (4.9 + DeepSeek's Mathlib fork): skipped without Lean."""

import json

import pytest
from conftest import DATA_DIR
from grpo.rewards.lean import setup_problem, verifier_from_env, verify

DATA = DATA_DIR / "minif2f"
PROBLEM = setup_problem()

pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"needs Lean: {PROBLEM}")


def _rows(name):
    if not DATA.is_dir():
        return []
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


@pytest.mark.parametrize("row", _rows("known_proofs.jsonl"), ids=lambda r: r["id"])
def test_known_proof_gets_its_expected_verdict(row):
    statements = {r["name"]: r for r in _rows("minif2f.jsonl")}
    sample = {
        "formal_statement": statements[row["name"]]["formal_statement"],
        "header": statements[row["name"]]["header"],
    }
    verdict = verify(f"```lean4\n{row['full_proof']}```", sample, verifier_from_env(), timeout_s=300)
    assert verdict.valid == (row["expected"] == "valid"), verdict
