"""CPU time of `pack`, the trainer's packing of one micro-batch: 128 rows of 1-20 prompt and 0-64
completion tokens (random, fixed seed), 200 calls after 5 warm-up calls. Run it with another tree's
`grpo` first on `PYTHONPATH` to compare two versions. Last line: one JSON object.

    python benchmarks/pack_cpu.py
"""

from __future__ import annotations

import json
import random
import time

from grpo.trainer.policy_trainer import pack

ROWS, CALLS = 128, 200


def main() -> None:
    rng = random.Random(0)
    prompts = [[rng.randint(1, 50) for _ in range(rng.randint(1, 20))] for _ in range(ROWS)]
    completions = [[rng.randint(1, 50) for _ in range(rng.randint(0, 64))] for _ in range(ROWS)]
    for _ in range(5):
        pack(prompts, completions, 0)
    start = time.perf_counter()
    for _ in range(CALLS):
        pack(prompts, completions, 0)
    ms = (time.perf_counter() - start) / CALLS * 1e3
    print(json.dumps({"benchmark": "pack_cpu", "rows": ROWS, "ms_per_pack": round(ms, 2)}))


if __name__ == "__main__":
    main()
