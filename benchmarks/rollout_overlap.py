"""GRPO steps with `rollout.overlap` against without, side by side: how long the loop takes.

Runs a recipe's loop `--rounds` times each way, alternating (without, with, without, with, ...), for
`--steps` steps each, with held-out evaluation and checkpoints between steps off (`eval.prompts: 0`).
Every run starts its own Ray cluster and engines; their start is not counted. Reports per mode:
- `loop_s`: the sum of `time/step_s` over a run's steps (the first step of an overlapped run samples
  two batches, its last none), the median over runs;
- `step_s`: the median `time/step_s` of the steps between the first and the last;
- the medians of the parts (`rollout_s`, `reward_s`, `train_s`, `sync_s`), measured as each ran:
  overlapped, rollout and training share the machine;
- `sampler_logprob_diff`: the mean gap between vLLM's sampling logprobs and the trainer's, which
  overlap raises by the one-step lag.

The last line is one JSON object with both modes and `loop_ratio`, with over without.
`--warmup-steps N` first runs N steps without overlap, not counted: on a GPU the first run of a
machine compiles kernels (Triton, vLLM) that later runs find in their caches.

    python benchmarks/rollout_overlap.py recipes/arithmetic_grpo.yaml --steps 12 --rounds 2 \\
        [--warmup-steps 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

PARTS = ("rollout", "reward", "train", "sync")


def run_once(recipe_path: str, overrides: list[str], overlap: bool, steps: int, out: str, index: int) -> list:
    """The metrics records of one run."""
    from grpo.config import load_recipe
    from grpo.metrics import read_metrics
    from grpo.orchestrator import train

    recipe = load_recipe(recipe_path, overrides)
    recipe.run.output_dir, recipe.run.name = out, f"overlap-{overlap}-{index}"
    recipe.rollout.overlap, recipe.train.steps = overlap, steps
    recipe.eval.prompts, recipe.eval.interval, recipe.train.checkpoint_interval = 0, 0, 0
    train(recipe, show_progress=False)
    return read_metrics(recipe.run_dir)


def summarize(records: list[dict]) -> dict:
    middle = records[1:-1]
    return {
        "loop_s": sum(r["time/step_s"] for r in records),
        "step_s": statistics.median(r["time/step_s"] for r in middle),
        **{f"{part}_s": statistics.median(r[f"time/{part}_s"] for r in middle) for part in PARTS},
        "sampler_logprob_diff": statistics.fmean(r["sampler_logprob_diff"] for r in records),
        "reward_mean": statistics.fmean(r["reward/mean"] for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps: at least 3, so that a step lies between the first and the last")

    import torch

    runs: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as out:
        if args.warmup_steps:
            run_once(args.recipe, args.overrides, False, args.warmup_steps, out, -1)
        for index in range(args.rounds):
            for overlap in (False, True):
                result = summarize(run_once(args.recipe, args.overrides, overlap, args.steps, out, index))
                runs[overlap].append(result)
                print(f"overlap={overlap} round {index}: {json.dumps(result)}", flush=True)
    modes = {
        name: {key: statistics.median(r[key] for r in runs[overlap]) for key in runs[overlap][0]}
        for name, overlap in (("without", False), ("with", True))
    }
    print(
        json.dumps(
            {
                "recipe": args.recipe,
                "overrides": args.overrides,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "steps": args.steps,
                "rounds": args.rounds,
                "warmup_steps": args.warmup_steps,
                **modes,
                "loop_ratio": modes["with"]["loop_s"] / modes["without"]["loop_s"],
                "step_ratio": modes["with"]["step_s"] / modes["without"]["step_s"],
            }
        )
    )


if __name__ == "__main__":
    main()
