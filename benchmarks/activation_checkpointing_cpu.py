"""What `train.gradient_checkpointing` saves and costs in one GRPO train step on the CPU: the peak
resident memory the step adds to a process that has loaded the trainer, and the step's time, with and
without. The tiny DeepSeek-V3 grown to 8 layers of hidden 256 (`--tiny` overrides), one micro-batch of
16 completions of 192 tokens after 32-token prompts. Each variant runs in a fresh process
(`ru_maxrss` is a process's lifetime peak), the two alternating, `--rounds` times. Last line: one
JSON object with the medians and their ratios.

    python benchmarks/activation_checkpointing_cpu.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = {"hidden_size": 256, "num_hidden_layers": 8, "max_position_embeddings": 256}
ROWS, PROMPT, COMPLETION = 16, 32, 192


def one_step(model_path: str, checkpointing: bool) -> dict:
    import torch

    from grpo.trainer.policy_trainer import PolicyTrainer, RolloutBatch

    recipe = {
        "model": {"path": model_path},
        "train": {"micro_batch_size": ROWS, "gradient_checkpointing": checkpointing, "threads": 2},
        "rollout": {"max_tokens": COMPLETION},
    }
    trainer = PolicyTrainer(model_path, recipe, pad_id=0)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 90, (ROWS, PROMPT), generator=generator).tolist()
    completions = torch.randint(3, 90, (ROWS, COMPLETION), generator=generator).tolist()
    batch = RolloutBatch(prompts, completions, [(-1.0) ** row for row in range(ROWS)], [[] for _ in prompts])
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    trainer.train_step(batch, 1)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_s": seconds, "step_peak_mb": (peak_kb - before_kb) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(args.child[0], args.child[1] == "on")))
        return
    from grpo.models.build import materialize

    model_path = materialize("tiny:deepseek_v3", Path(tempfile.mkdtemp()) / "model", tiny_overrides=TINY)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for variant in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--child", model_path, variant],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(variant, runs[variant][-1], flush=True)
    median = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    print(
        json.dumps(
            {
                "benchmark": "activation_checkpointing_cpu",
                "tokens": ROWS * (PROMPT + COMPLETION),
                "rounds": args.rounds,
                "step_peak_mb_off": round(median["off"]["step_peak_mb"], 1),
                "step_peak_mb_on": round(median["on"]["step_peak_mb"], 1),
                "peak_ratio_on_over_off": round(
                    median["on"]["step_peak_mb"] / median["off"]["step_peak_mb"], 3
                ),
                "step_s_off": round(median["off"]["step_s"], 3),
                "step_s_on": round(median["on"]["step_s"], 3),
                "time_ratio_on_over_off": round(median["on"]["step_s"] / median["off"]["step_s"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
