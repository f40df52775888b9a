"""What filling micro-batches with rows of similar length saves in one GRPO train step on the CPU:
the padded positions the forward and backward compute, and the step's time, with the rows in the
batch's order and in order of length (`PolicyTrainer.order_rows_by_length`).

The batch is a GRPO step's: 8 prompts of 24-48 tokens, 8 completions each, whose lengths are drawn
from 4 to 192 tokens (long-tailed, as a policy's are: most short, a few running to the budget), in
micro-batches of 8 rows, on the tiny DeepSeek-V3 grown to 4 layers of hidden 256. The two variants
alternate in one process after a warm-up step of each, `--rounds` times. Last line: one JSON object.

    python benchmarks/micro_batch_order_cpu.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

TINY = {"hidden_size": 256, "num_hidden_layers": 4, "max_position_embeddings": 256}
PROMPTS, GROUP, MICRO_BATCH, MAX_COMPLETION = 8, 8, 8, 192


def _batch():
    import torch

    from grpo.trainer.policy_trainer import RolloutBatch

    generator = torch.Generator().manual_seed(0)
    prompt_ids, completion_ids = [], []
    for _ in range(PROMPTS):
        prompt = torch.randint(
            3, 90, (int(torch.randint(24, 49, (1,), generator=generator)),), generator=generator
        )
        for _ in range(GROUP):
            # exponential lengths around 40 tokens, capped at the budget
            length = min(MAX_COMPLETION, 4 + int(torch.empty(1).exponential_(1 / 36, generator=generator)))
            prompt_ids.append(prompt.tolist())
            completion_ids.append(torch.randint(3, 90, (length,), generator=generator).tolist())
    advantages = [(-1.0) ** row for row in range(len(prompt_ids))]
    return RolloutBatch(prompt_ids, completion_ids, advantages, [[] for _ in prompt_ids])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from grpo.models.build import materialize
    from grpo.trainer.policy_trainer import PolicyTrainer

    model_path = materialize("tiny:deepseek_v3", Path(tempfile.mkdtemp()) / "model", tiny_overrides=TINY)
    recipe = {
        "model": {"path": model_path},
        "train": {"micro_batch_size": MICRO_BATCH, "threads": 2},
        "rollout": {"max_tokens": MAX_COMPLETION},
    }
    trainer = PolicyTrainer(model_path, recipe, pad_id=0)
    batch = _batch()
    real = sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids))
    computed, seconds = {}, {}
    for variant, ordered in (("as_given", False), ("by_length", True)):
        trainer.order_rows_by_length = ordered
        computed[variant] = sum(p.input_ids_BL.numel() for _, p in trainer._micro_batches(batch))
        trainer.train_step(batch, 1)  # warm-up
        seconds[variant] = []
    for _ in range(args.rounds):
        for variant, ordered in (("as_given", False), ("by_length", True)):
            trainer.order_rows_by_length = ordered
            start = time.perf_counter()
            trainer.train_step(batch, 1)
            seconds[variant].append(time.perf_counter() - start)
            print(variant, round(seconds[variant][-1], 3), flush=True)
    median = {variant: statistics.median(times) for variant, times in seconds.items()}
    print(
        json.dumps(
            {
                "benchmark": "micro_batch_order_cpu",
                "rows": len(batch.prompt_ids),
                "micro_batch_size": MICRO_BATCH,
                "real_tokens": real,
                "computed_positions_as_given": computed["as_given"],
                "computed_positions_by_length": computed["by_length"],
                "computed_ratio": round(computed["by_length"] / computed["as_given"], 3),
                "rounds": args.rounds,
                "step_s_as_given": round(median["as_given"], 3),
                "step_s_by_length": round(median["by_length"], 3),
                "step_time_ratio": round(median["by_length"] / median["as_given"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
