"""Everything about a Lean 4 proof that can be judged without Lean.

A completion (DeepSeek-Prover style) continues a prompt that ends inside a code block:
"Complete the following Lean 4 code:\\n\\n```lean4\\n<header><informal prefix><formal_statement>".
The model either continues the proof directly or restates the whole theorem in a new code block.
`assemble` turns either form into the theorem text to check; the guards then reject, each with its own
reason, what Lean alone would accept: `sorry`, a changed statement, new axioms, code run at check
time, or checker options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ALLOWED_AXIOMS = frozenset({"propext", "Classical.choice", "Quot.sound"})

# Tokens that make Lean accept what is not a proof, or run code while checking.
FORBIDDEN = {
    "sorry": r"\bsorry\b",
    "admit": r"\badmit\b",
    "axiom": r"^\s*(?:private\s+|protected\s+)?axiom\b",
    "opaque": r"\bopaque\b",
    "extern": r"@\[\s*extern\b",
    "implemented_by": r"@\[\s*implemented_by\b",
    "#eval": r"#eval\b",
    "run_cmd": r"\brun_cmd\b",
    "run_tac": r"\brun_tac\b",
    "run_elab": r"\brun_elab\b",
    "#exit": r"#exit\b",
    "debug option": r"\bset_option\s+debug\.",
    "elab": r"^\s*(?:@\[[^\]]*\]\s*)?(?:local\s+|scoped\s+)?elab(?:_rules)?\b",
    "macro": r"^\s*(?:@\[[^\]]*\]\s*)?(?:local\s+|scoped\s+)?macro(?:_rules)?\b",
    "syntax": r"^\s*(?:@\[[^\]]*\]\s*)?(?:local\s+|scoped\s+)?syntax\b",
    "notation": r"^\s*(?:local\s+|scoped\s+)?(?:notation|infix|infixl|infixr|prefix|postfix)\b",
    "unsafe": r"\bunsafe\b",
    "import": r"^\s*import\b",
}
_FORBIDDEN_RE = {name: re.compile(pattern, re.MULTILINE) for name, pattern in FORBIDDEN.items()}
_CODE_BLOCK = re.compile(r"```(?:lean4|lean)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Verdict:
    valid: bool
    reason: str
    """`ok`, or why not: `no_proof`, `statement_mismatch`, `forbidden:<what>`, `lean_error`, `sorry`,
    `bad_axioms`, `timeout`, `crash`, `too_long`."""
    detail: str = ""


def strip_comments_and_strings(code: str) -> str:
    """Blank out comments (`--`, nested `/- -/`) and string literals, keeping line structure."""
    out, i, depth, n = [], 0, 0, len(code)
    while i < n:
        two = code[i : i + 2]
        if depth:
            if two == "/-":
                depth, i = depth + 1, i + 2
            elif two == "-/":
                depth, i = depth - 1, i + 2
            else:
                out.append("\n" if code[i] == "\n" else " ")
                i += 1
        elif two == "/-":
            depth, i = 1, i + 2
        elif two == "--":
            end = code.find("\n", i)
            i = n if end < 0 else end
        elif code[i] == '"':
            end = i + 1
            while end < n and code[end] != '"':
                end += 2 if code[end] == "\\" else 1
            out.append('""')
            i = end + 1
        else:
            out.append(code[i])
            i += 1
    return "".join(out)


def normalize_statement(statement: str) -> str:
    """Whitespace-insensitive form of a theorem statement, without the trailing `:= by`.

    >>> normalize_statement("theorem t (x : ℕ) :\\n    x = x := by\\n")
    'theorem t (x : ℕ) : x = x'
    """
    text = " ".join(strip_comments_and_strings(statement).split())
    return re.sub(r"\s*:=\s*(by)?\s*$", "", text)


def theorem_name(formal_statement: str) -> str:
    match = re.search(r"\b(?:theorem|lemma)\s+([^\s(:{\[]+)", formal_statement)
    assert match, f"no theorem in {formal_statement[:80]!r}"
    return match.group(1)


def assemble(completion: str, formal_statement: str) -> str | None:
    """The code (helper lemmas + the theorem and its proof) the completion stands for, or None.

    If the last Lean code block restates the theorem, that block is the code (its `import` lines
    dropped: the header is elaborated separately); otherwise the text up to the closing fence
    continues `formal_statement`.

    >>> assemble("  simp\n```", "theorem t : 1 = 1 := by\n")
    'theorem t : 1 = 1 := by\n  simp\n'
    """
    declares = re.compile(rf"\b(?:theorem|lemma)\s+{re.escape(theorem_name(formal_statement))}\b")
    for block in reversed(_CODE_BLOCK.findall(completion)):
        if declares.search(block):
            return "".join(line for line in block.splitlines(keepends=True) if not line.startswith("import "))
    continuation = completion.split("```", 1)[0]
    if not continuation.strip():
        return None
    return formal_statement + continuation


def statement_in(code: str, formal_statement: str) -> str | None:
    """The statement of the benchmark theorem as written in `code` (up to its `:=`)."""
    clean = strip_comments_and_strings(code)
    name = theorem_name(formal_statement)
    start = re.search(rf"\b(?:theorem|lemma)\s+{re.escape(name)}(?=[\s(:{{\[])", clean)
    if start is None:
        return None
    end = clean.find(":=", start.start())
    return None if end < 0 else clean[start.start() : end]


def static_verdict(code: str | None, formal_statement: str, max_chars: int = 100_000) -> Verdict | None:
    """A rejection that needs no Lean, or None if the code must go to Lean."""
    if code is None:
        return Verdict(False, "no_proof")
    if len(code) > max_chars:
        return Verdict(False, "too_long", f"{len(code)} characters")
    written = statement_in(code, formal_statement)
    if written is None or normalize_statement(written) != normalize_statement(formal_statement):
        return Verdict(False, "statement_mismatch", (written or "")[:300])
    clean = strip_comments_and_strings(code)
    for name, pattern in _FORBIDDEN_RE.items():
        if pattern.search(clean):
            return Verdict(False, f"forbidden:{name}")
    if len(re.findall(rf"\b(?:theorem|lemma)\s+{re.escape(theorem_name(formal_statement))}\b", clean)) != 1:
        return Verdict(False, "statement_mismatch", "the theorem is declared more than once")
    return None


_AXIOMS_RE = re.compile(r"'([^']+)' depends on axioms: \[([^\]]*)\]")


def verdict_from_repl(reply: dict, name: str) -> Verdict:
    """Judge the REPL's JSON reply to `code + "\\n#print axioms <name>"`."""
    messages = reply.get("messages", [])
    errors = [m.get("data", "") for m in messages if m.get("severity") == "error"]
    if errors:
        return Verdict(False, "lean_error", errors[0][:500])
    if reply.get("sorries") or any("declaration uses 'sorry'" in m.get("data", "") for m in messages):
        return Verdict(False, "sorry")
    for message in messages:
        data = message.get("data", "")
        if f"'{name}' does not depend on any axioms" in data:
            return Verdict(True, "ok")
        match = _AXIOMS_RE.search(data)
        if match and match.group(1) == name:
            used = {a.strip() for a in match.group(2).split(",") if a.strip()}
            extra = sorted(used - ALLOWED_AXIOMS)
            return Verdict(False, "bad_axioms", ", ".join(extra)) if extra else Verdict(True, "ok")
    return Verdict(False, "lean_error", "no axiom report for the theorem (did it elaborate?)")
