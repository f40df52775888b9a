"""Supervised warm-up of the demo's tiny DeepSeek-V3 in FP8 against BF16 (and FP32), same seed.

Runs `grpo sft` on the arithmetic task three times with identical data order and initialisation:
- `fp32`: FP32 weights and GEMMs;
- `bf16`: BF16 weights and GEMMs;
- `fp8`: FP32 master weights, every linear layer but embedding/head/router/norms in FP8 GEMMs.
Reports the final loss (mean of the last 20 steps) and the relative differences. Target from the
FP8 issue: |fp8 - bf16| / bf16 <= 1%. Last line: one JSON object.

    python benchmarks/fp8_vs_bf16_sft.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from grpo.config import recipe_from_dict
from grpo.sft import sft

VARIANTS = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "fp8": {"dtype": "float32", "fp8": True},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, model in VARIANTS.items():
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
                    "train": {"threads": 2},
                }
            )
            summary = sft(recipe, log=lambda line, name=name: print(f"[{name}] {line}", flush=True))
            results[name] = {"final_loss": summary["final_loss"], "seconds": summary["wall_time_s"]}
    bf16, fp8, fp32 = (results[k]["final_loss"] for k in ("bf16", "fp8", "fp32"))
    print(
        json.dumps(
            {
                "benchmark": "fp8_vs_bf16_sft",
                "steps": args.steps,
                **{f"loss_{k}": round(v["final_loss"], 5) for k, v in results.items()},
                **{f"seconds_{k}": round(v["seconds"], 1) for k, v in results.items()},
                "rel_diff_fp8_vs_bf16": round(abs(fp8 - bf16) / bf16, 5),
                "rel_diff_fp8_vs_fp32": round(abs(fp8 - fp32) / fp32, 5),
                "rel_diff_bf16_vs_fp32": round(abs(bf16 - fp32) / fp32, 5),
            }
        )
    )


if __name__ == "__main__":
    main()
