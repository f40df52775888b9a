"""`grpo reward NAME --input FILE.jsonl`: score completions outside training.

Each input line holds `completion` plus the sample's fields; each output line is the input plus
`reward`, `status` and `components`. A summary (counts per status, calls/s, latency) goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

from grpo.rewards.runtime import RewardEntry, RewardRuntime

from grpo.jsonl import read_objects


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"input file not found: {path}")
    return read_objects(
        path, lambda row: isinstance(row.get("completion"), str), "needs a string field 'completion'"
    )


def score_file(name: str, input_path: Path, output: str, workers: int, timeout_s: float) -> None:
    rows = read_jsonl(input_path)
    # checked before scoring, which may take long; the file itself is opened after, since it may be the input
    if output != "-" and (Path(output).is_dir() or not Path(output).parent.is_dir()):
        raise ValueError(f"--output {output}: not a file in an existing folder")
    started = time.perf_counter()
    with RewardRuntime([RewardEntry(name, name)], workers=workers, timeout_s=timeout_s) as runtime:
        scored = runtime.score(
            [r["completion"] for r in rows], [{k: v for k, v in r.items() if k != "completion"} for r in rows]
        )
    elapsed = time.perf_counter() - started
    with contextlib.nullcontext(sys.stdout) if output == "-" else open(output, "w") as handle:
        for row, s in zip(rows, scored):
            record = {**row, "reward": s.reward, "status": s.status, "components": s.components_record()}
            handle.write(json.dumps(record) + "\n")
    latencies = sorted(o.seconds for s in scored for o in s.components.values())
    counts = {
        status: sum(s.status == status for s in scored)
        for status in ("ok", "wrong", "n/a", "error", "timeout")
    }
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0
    print(
        json.dumps(
            {
                "completions": len(rows),
                **counts,
                "calls_per_s": len(rows) / elapsed,
                "p50_s": statistics.median(latencies) if latencies else 0.0,
                "p99_s": p99,
            }
        ),
        file=sys.stderr,
    )
