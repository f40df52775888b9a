"""Supervised warm-up of the demo's tiny DeepSeek-V3 in FP8 against BF16 (and FP32), same seed.

Runs `grpo sft` on the arithmetic task with identical data order and initialisation, once per variant:
- `fp32`: FP32 weights and GEMMs;
- `bf16`: BF16 weights and GEMMs, no master copy (updates below a BF16 ulp are lost);
- `fp8`: FP32 weights, every linear layer but embedding/head/router/norms in FP8 GEMMs;
- `bf16_masters`: BF16 weights and GEMMs, FP32 master weights and BF16 Adam moments
  (`train.bf16_moments`), DeepSeek-V3's BF16 baseline;
- `fp8_bf16_masters`: the same with FP8 GEMMs, DeepSeek-V3's FP8 recipe: the pair differs only in
  the GEMMs' precision.
Reports the final loss (mean of the last 20 steps) and, for the pairs run, the signed relative
difference (variant - baseline) / baseline.
Target from the FP8 issue: FP8 within 1% of BF16. Last line: one JSON object.

    python benchmarks/fp8_vs_bf16_sft.py [--steps 300] [--seed 0] [--threads 2] [--variants fp32,bf16,fp8]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from grpo.config import recipe_from_dict
from grpo.sft import sft

VARIANTS = {  # (model options, train options)
    "fp32": ({"dtype": "float32"}, {}),
    "bf16": ({"dtype": "bfloat16"}, {}),
    "fp8": ({"dtype": "float32", "fp8": True}, {}),
    "bf16_masters": ({"dtype": "bfloat16"}, {"bf16_moments": True}),
    "fp8_bf16_masters": ({"dtype": "bfloat16", "fp8": True}, {"bf16_moments": True}),
}
# (variant, baseline): relative difference of the first's final loss from the second's
PAIRS = [("fp8", "bf16"), ("fp8", "fp32"), ("bf16", "fp32"), ("fp8_bf16_masters", "bf16_masters")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="CPU threads; another count changes only the order of floating-point sums (a control)",
    )
    parser.add_argument(
        "--variants", default="fp32,bf16,fp8", help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            model, train = VARIANTS[name]
            recipe = recipe_from_dict(
                {
                    "run": {"name": name, "output_dir": scratch, "seed": args.seed},
                    "model": {"path": "tiny:deepseek_v3", **model},
                    "sft": {
                        "steps": args.steps,
                        "batch_size": 32,
                        "learning_rate": 3e-3,
                        "boxed_fraction": 1.0,
                    },
                    "train": {"threads": args.threads, **train},
                }
            )
            summary = sft(recipe, log=lambda line, name=name: print(f"[{name}] {line}", flush=True))
            results[name] = {"final_loss": summary["final_loss"], "seconds": summary["wall_time_s"]}
    print(
        json.dumps(
            {
                "benchmark": "fp8_vs_bf16_sft",
                "steps": args.steps,
                "seed": args.seed,
                "threads": args.threads,
                **{f"loss_{k}": round(v["final_loss"], 5) for k, v in results.items()},
                **{f"seconds_{k}": round(v["seconds"], 1) for k, v in results.items()},
                **{
                    f"rel_diff_{a}_vs_{b}": round(
                        (results[a]["final_loss"] - results[b]["final_loss"]) / results[b]["final_loss"], 5
                    )
                    for a, b in PAIRS
                    if a in results and b in results
                },
            }
        )
    )


if __name__ == "__main__":
    main()
