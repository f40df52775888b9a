import json

import pytest
from conftest import DATA_DIR, needs_data
from grpo.rewards.lean_checks import assemble, normalize_statement, static_verdict, verdict_from_repl

DATA = DATA_DIR / "minif2f"
STATEMENT = "theorem t (x : ℕ) (h : x = 2) :\n    x + 1 = 3 := by\n"


def _rows(name):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def test_a_continuation_is_appended_to_the_statement():
    assert assemble("  subst h\n  rfl\n```\nDone.", STATEMENT) == STATEMENT + "  subst h\n  rfl\n"


def test_a_restated_theorem_in_the_last_code_block_is_taken_without_imports():
    completion = (
        "Idea...\n```lean4\nimport Mathlib\nlemma helper : True := trivial\n" + STATEMENT + "  omega\n```"
    )
    assert assemble(completion, STATEMENT) == "lemma helper : True := trivial\n" + STATEMENT + "  omega\n"


def test_an_empty_completion_has_no_proof():
    assert static_verdict(assemble("```", STATEMENT), STATEMENT).reason == "no_proof"


def test_statements_compare_modulo_whitespace_and_comments():
    assert normalize_statement(
        "theorem t (x : ℕ) -- note\n (h : x = 2) : x + 1 = 3 := by"
    ) == normalize_statement(STATEMENT)


@pytest.mark.parametrize(
    ("proof", "reason"),
    [
        ("  sorry\n", "forbidden:sorry"),
        ("  admit\n", "forbidden:admit"),
        ("  omega\n#eval 1\n", "forbidden:#eval"),
        ("  omega\nset_option debug.skipKernelTC true\n", "forbidden:debug option"),
        ("  omega\nrun_cmd pure ()\n", "forbidden:run_cmd"),
        ("  omega\n#exit\n", "forbidden:#exit"),
        ('  omega\nmacro "omega" : tactic => `(tactic| sorry)\n', "forbidden:sorry"),
        ('  omega\nmacro "my_tac" : tactic => `(tactic| rfl)\n', "forbidden:macro"),
        ("  omega\n@[implemented_by f] def g := 1\n", "forbidden:implemented_by"),
    ],
)
def test_guards_reject_each_cheat_with_its_own_reason(proof, reason):
    assert static_verdict(STATEMENT + proof, STATEMENT).reason == reason


def test_sorry_inside_a_comment_or_string_is_not_a_cheat():
    assert static_verdict(STATEMENT + "  -- no sorry here\n  /- admit -/ omega\n", STATEMENT) is None


def test_a_changed_statement_is_a_mismatch():
    tampered = "theorem t (x : ℕ) (h : x = 2) (bad : False) :\n    x + 1 = 3 := by\n  exact bad.elim\n"
    assert static_verdict(tampered, STATEMENT).reason == "statement_mismatch"


@needs_data
def test_known_invalid_proofs_that_need_no_lean_are_rejected_statically():
    statements = {r["name"]: r["formal_statement"] for r in _rows("minif2f.jsonl")}
    expected = {
        "sorry": "forbidden:sorry",
        "partial_sorry": "forbidden:sorry",
        "statement_tampered": "statement_mismatch",
        "axiom_injection": "forbidden:axiom",
        "false_statement": "statement_mismatch",
    }
    seen = {}
    for row in _rows("known_proofs.jsonl"):
        completion = f"```lean4\n{row['full_proof']}```"
        verdict = static_verdict(assemble(completion, statements[row["name"]]), statements[row["name"]])
        if row["expected"] == "valid":
            assert verdict is None, (row["id"], verdict)
        elif row["category"] in expected:
            assert verdict is not None and verdict.reason == expected[row["category"]], row["id"]
            seen[row["category"]] = True
    assert seen.keys() == expected.keys()


def test_repl_replies_are_judged():
    axioms = {"severity": "info", "data": "'t' depends on axioms: [propext, Classical.choice, Quot.sound]"}
    assert verdict_from_repl({"messages": [axioms]}, "t").valid
    assert verdict_from_repl(
        {"messages": [{"severity": "info", "data": "'t' does not depend on any axioms"}]}, "t"
    ).valid
    cheat = {"severity": "info", "data": "'t' depends on axioms: [propext, cheat]"}
    assert (
        verdict_from_repl({"messages": [cheat]}, "t").reason,
        verdict_from_repl({"messages": [cheat]}, "t").detail,
    ) == ("bad_axioms", "cheat")
    error = {"severity": "error", "data": "unsolved goals"}
    assert verdict_from_repl({"messages": [error, axioms]}, "t").reason == "lean_error"
    warning = {"severity": "warning", "data": "declaration uses 'sorry'"}
    assert verdict_from_repl({"messages": [warning, axioms]}, "t").reason == "sorry"
    assert verdict_from_repl({"messages": [], "sorries": [{"goal": "⊢ False"}]}, "t").reason == "sorry"
