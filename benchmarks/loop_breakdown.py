"""Where the seconds of a GRPO step go, and how much rollout speed the loop keeps against vLLM alone.

Reads a finished run folder (`metrics.jsonl`, `config.yaml`), then starts the same vLLM engine class
with the same engine arguments in this process (no Ray, no trainer beside it) on the run's final
checkpoint and samples the same prompts (the run's first training steps, same group size, length and
temperature). Prints medians over the run's steps (after the first, which warms up) and, last, one
JSON line:

- `step_s`, `rollout_s`, `reward_s`, `logprobs_s` (reference/old-policy passes), `train_s` (includes
  logprobs_s), `sync_s` (publish + engine reload + parity check);
- `loop_rollout_tokens_per_s` against `standalone_rollout_tokens_per_s` and their ratio;
- `sync_seconds_per_gb` (publish + reload only), `trainer_tokens_per_s` and `mfu_vs_bf16_peak`
  (6 x active parameters x trainer tokens/s over the card's dense BF16 peak; an FP8 run is measured
  against the same BF16 peak);
- the vLLM/trainer parity of the run (max and mean absolute logprob difference per token).

    python benchmarks/loop_breakdown.py runs/arithmetic-grpo-h100 [--peak-tflops 989]
        [--engine-kwarg quantization=none]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from grpo.config import load_recipe
from grpo.data import train_prompts
from grpo.metrics import read_metrics
from grpo.models.build import load_tokenizer
from grpo.rollout.vllm_engine import SamplingSpec, VllmEngine


def active_parameters(model_path: str) -> int:
    """Parameters one token passes through: routed experts count top_k / n_experts of theirs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_experts", 1)
    return int(total - routed + routed * config.num_experts_per_tok / experts)


def median(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else None


def standalone_tokens_per_s(recipe, model_path: str, batches: int) -> float:
    tokenizer = load_tokenizer(model_path)
    prompts = train_prompts(recipe.data, recipe.run.seed)
    engine = VllmEngine(model_path, recipe.model.dtype, recipe.run.seed, recipe.rollout.engine_kwargs)
    spec = SamplingSpec(
        n=recipe.rollout.group_size,
        max_tokens=recipe.rollout.max_tokens,
        temperature=recipe.rollout.temperature,
        top_p=recipe.rollout.top_p,
    )
    rates = []
    for _ in range(batches + 1):
        ids = [tokenizer(next(prompts)["prompt"])["input_ids"] for _ in range(recipe.train.prompts_per_step)]
        start = time.perf_counter()
        groups = engine.generate(ids, spec)
        seconds = time.perf_counter() - start
        rates.append(sum(len(c.token_ids) for group in groups for c in group) / seconds)
    return statistics.median(rates[1:])  # the first batch warms up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak (H100 SXM: 989)")
    parser.add_argument(
        "--batches", type=int, default=5, help="standalone engine batches to time (0: no standalone engine)"
    )
    parser.add_argument(
        "--engine-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the run's engine argument for the standalone engine (VALUE none removes it), "
        "e.g. quantization=none to time BF16 sampling for a run that sampled in FP8",
    )
    args = parser.parse_args()

    recipe = load_recipe(args.run_dir / "config.yaml")
    for item in args.engine_kwarg:
        key, _, value = item.partition("=")
        if value == "none":
            recipe.rollout.engine_kwargs.pop(key, None)
        else:
            recipe.rollout.engine_kwargs[key] = value
    records = read_metrics(args.run_dir)[1:]
    final = str(args.run_dir / "checkpoints" / "final")
    sync = [r for r in records if "sync/gigabytes" in r]
    result = {
        "run": str(args.run_dir),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "fp8": recipe.model.fp8,
        "standalone_engine_kwargs": recipe.rollout.engine_kwargs,
        "steps_measured": len(records),
        **{
            f"{name}_s": median(records, f"time/{name}_s")
            for name in ("step", "rollout", "reward", "logprobs", "train", "sync")
        },
        "loop_rollout_tokens_per_s": median(records, "rollout_tokens_per_s"),
        "trainer_tokens_per_s": median(records, "trainer_tokens_per_s"),
        "sync_gigabytes": sync[0]["sync/gigabytes"] if sync else None,
        "sync_seconds_per_gb": statistics.median(r["sync/seconds"] / r["sync/gigabytes"] for r in sync)
        if sync
        else None,
        "parity_max_abs_diff": max((r["sync/parity_max_abs_diff"] for r in sync), default=None),
        "parity_mean_abs_diff": median(sync, "sync/parity_mean_abs_diff"),
    }
    active = active_parameters(final)
    result["active_parameters"] = active
    result["mfu_vs_bf16_peak"] = 6 * active * result["trainer_tokens_per_s"] / (args.peak_tflops * 1e12)
    if args.batches > 0:
        standalone = standalone_tokens_per_s(recipe, final, args.batches)
        result["standalone_rollout_tokens_per_s"] = standalone
        result["loop_over_standalone"] = result["loop_rollout_tokens_per_s"] / standalone
    for key, value in result.items():
        print(f"{key:34} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
