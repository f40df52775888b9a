"""Lean 4 proof reward: 1.0 for a proof Lean accepts and every guard passes, else 0.0.

The verifier comes from the environment, so the reward keeps the plain reward signature and works
in the reward runtime's worker processes:

- `GRPO_LEAN_PROJECT` (a Mathlib project folder) and `GRPO_LEAN_REPL` (the built `repl` binary):
  the local REPL pool; `GRPO_LEAN_WORKERS` (default 1) processes per reward worker,
  `GRPO_LEAN_MEMORY_MB` (default 8192) address-space limit per process;
- or `GRPO_KIMINA_URL` (and optionally `GRPO_KIMINA_API_KEY`): a Kimina Lean Server;
- `GRPO_LEAN_TIMEOUT` seconds per proof (default 60).

Samples carry `formal_statement` and `header` (miniF2F/ProofNet rows as shipped).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from grpo.rewards.lean_checks import Verdict, assemble, static_verdict, theorem_name, verdict_from_repl
from grpo.rewards.lean_repl import KiminaClient, ReplPool, VerifierCrash, VerifierTimeout

SETUP_HINT = (
    "Lean is not set up: set GRPO_LEAN_PROJECT (a Mathlib project) and GRPO_LEAN_REPL (the built repl "
    "binary), or GRPO_KIMINA_URL; see the README section 'Setting up Lean'"
)


def setup_problem() -> str | None:
    """Why the Lean verifier cannot run here, or None if it can."""
    if os.environ.get("GRPO_KIMINA_URL"):
        return None
    project, repl = os.environ.get("GRPO_LEAN_PROJECT"), os.environ.get("GRPO_LEAN_REPL")
    if not project or not repl:
        return SETUP_HINT
    if shutil.which("lake") is None:
        return "Lean is not set up: `lake` is not on PATH (install elan, see the README)"
    if not os.path.isdir(project) or not os.path.isfile(repl):
        return f"Lean is not set up: GRPO_LEAN_PROJECT={project} or GRPO_LEAN_REPL={repl} does not exist"
    return None


@lru_cache(maxsize=1)
def verifier_from_env():
    problem = setup_problem()
    if problem:
        raise ValueError(problem)
    if os.environ.get("GRPO_KIMINA_URL"):
        return KiminaClient(os.environ["GRPO_KIMINA_URL"], os.environ.get("GRPO_KIMINA_API_KEY"))
    return ReplPool.for_project(
        os.environ["GRPO_LEAN_PROJECT"],
        os.environ["GRPO_LEAN_REPL"],
        size=int(os.environ.get("GRPO_LEAN_WORKERS", "1")),
        memory_mb=int(os.environ.get("GRPO_LEAN_MEMORY_MB", "8192")),
    )


def verify(completion: str, sample: Mapping[str, Any], verifier, timeout_s: float) -> Verdict:
    """Extract, guard, then check with Lean (`#print axioms` appended); one distinct reason per failure."""
    statement = sample["formal_statement"]
    code = assemble(completion, statement)
    rejected = static_verdict(code, statement)
    if rejected is not None:
        return rejected
    assert code is not None
    name = theorem_name(statement)
    try:
        reply = verifier.check(sample.get("header", ""), f"{code}\n\n#print axioms {name}\n", timeout_s)
    except VerifierTimeout as error:
        return Verdict(False, "timeout", str(error))
    except VerifierCrash as error:
        return Verdict(False, "crash", str(error))
    return verdict_from_repl(reply, name)


def lean_proof(completion: str, sample: Mapping[str, Any]) -> tuple[float, str] | None:
    """(1.0, "ok") if the completion proves `sample["formal_statement"]`, else (0.0, why); None for
    rows without a formal statement."""
    if "formal_statement" not in sample:
        return None
    timeout_s = float(os.environ.get("GRPO_LEAN_TIMEOUT", "60"))
    verdict = verify(completion, sample, verifier_from_env(), timeout_s)
    note = verdict.reason + (f": {verdict.detail}" if verdict.detail else "")
    return (1.0 if verdict.valid else 0.0), note


lean_proof.setup_problem = setup_problem  # type: ignore[attr-defined]  # checked before any scoring
lean_proof.sample_fields = ("formal_statement",)  # type: ignore[attr-defined]
