"""Math reward throughput and accuracy on a few thousand completions built from MATH-500 answers.

Completions: each gold answer boxed as is, in an equivalent rewriting, stated as "the answer is",
and a wrong one (another problem's answer), plus pathological strings (a tower of powers, 1 MB of
garbage, 10k nested braces, an unclosed box). Scored through the reward runtime (worker processes,
hard timeout). Also scores the labelled completions with math-verify alone (its own extraction on
the whole completion) to compare accuracy. Last line: one JSON object.

    python benchmarks/reward_throughput.py [--data ../shared/data/math500/test.jsonl] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from grpo.eval.benchmarks import default_data_dir
from grpo.rewards.runtime import RewardEntry, RewardRuntime

from grpo.jsonl import read_objects

PATHOLOGICAL = [
    r"\boxed{9^{9^{9^{9}}}}",
    "x" * 1_000_000,
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    r"\boxed{\frac{1}{2}",
    "\\boxed{" + "9" * 5000 + "}",
    "\\boxed{" + "+".join(["x"] * 3000) + "}",
]


def equivalent_rewrite(answer: str) -> str:
    return answer.replace("\\frac", "\\dfrac").replace(" ", "")


def build(rows: list[dict], seed: int = 0) -> list[tuple[str, dict, float | None]]:
    rng = random.Random(seed)
    items = []
    for row in rows:
        gold = row["answer"]
        sample = {"answer": gold}
        items.append((f"We compute carefully. The final answer is $\\boxed{{{gold}}}$.", sample, 1.0))
        items.append((f"Therefore \\boxed{{{equivalent_rewrite(gold)}}}", sample, 1.0))
        items.append((f"The answer is {gold}", sample, 1.0))
        other = rng.choice(rows)["answer"]
        if other.replace(" ", "") != gold.replace(" ", ""):
            items.append((f"So \\boxed{{{other}}}.", sample, 0.0))
    for text in PATHOLOGICAL:
        items.append((text, {"answer": "1"}, None))
    return items


def math_verify_alone(completion: str, gold: str) -> float:
    from math_verify import parse, verify

    return 1.0 if verify(parse(f"${gold}$"), parse(completion)) else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(default_data_dir() / "math500/test.jsonl"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=1, help="score the set this many times")
    args = parser.parse_args()
    rows = read_objects(Path(args.data), lambda row: True, "a JSON object")
    items = build(rows) * args.repeat
    with RewardRuntime(
        [RewardEntry("math", "math")], workers=args.workers, timeout_s=args.timeout
    ) as runtime:
        runtime.score(["warm up"], [{"answer": "1"}])
        started = time.perf_counter()
        scored = runtime.score([c for c, _, _ in items], [s for _, s, _ in items])
        elapsed = time.perf_counter() - started
    labelled = [(s.reward, label) for s, (_, _, label) in zip(scored, items) if label is not None]
    ours = sum(r == label for r, label in labelled) / len(labelled)
    # math-verify alone, in this process, on the labelled items of one copy of the set
    baseline_items = [(c, s, label) for c, s, label in build(rows) if label is not None]
    baseline = sum(math_verify_alone(c, s["answer"]) == label for c, s, label in baseline_items) / len(
        baseline_items
    )
    latencies = sorted(o.seconds for s in scored for o in s.components.values())
    statuses = {k: sum(s.status == k for s in scored) for k in ("ok", "wrong", "error", "timeout")}
    worst_overrun = max(0.0, max(latencies) - args.timeout)
    print(f"{len(items)} completions in {elapsed:.1f} s; statuses {statuses}")
    print(f"accuracy on labelled completions: grpo math {ours:.4f}, math-verify alone {baseline:.4f}")
    print(
        json.dumps(
            {
                "benchmark": "reward_throughput",
                "completions": len(items),
                "calls_per_s": round(len(items) / elapsed, 1),
                "p50_s": round(statistics.median(latencies), 4),
                "p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 4),
                "max_s": round(latencies[-1], 3),
                "timeouts": statuses["timeout"],
                "errors": statuses["error"],
                "accuracy_grpo_math": round(ours, 4),
                "accuracy_math_verify_alone": round(baseline, 4),
                "timeout_s": args.timeout,
                "worst_overrun_s": round(worst_overrun, 3),
                "workers": args.workers,
            }
        )
    )


if __name__ == "__main__":
    main()
