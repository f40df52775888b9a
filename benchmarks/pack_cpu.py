"""CPU time of `pack`, the trainer's packing of one micro-batch: 128 rows of 1-20 prompt and 0-64
completion tokens (random, fixed seed), 200 calls after 5 warm-up calls; `ms_per_pack` without the
engine's logprobs (SFT), `ms_per_pack_with_sampler_logprobs` with them (the GRPO trainer). Run it with another tree's
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
    sampler = [[-rng.random() for _ in completion] for completion in completions]
    figures = {"benchmark": "pack_cpu", "rows": ROWS}
    for key, args in (("ms_per_pack", ()), ("ms_per_pack_with_sampler_logprobs", (sampler,))):
        for _ in range(5):
            pack(prompts, completions, 0, *args)
        start = time.perf_counter()
        for _ in range(CALLS):
            pack(prompts, completions, 0, *args)
        figures[key] = round((time.perf_counter() - start) / CALLS * 1e3, 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
