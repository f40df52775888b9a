"""Auxiliary-loss-free balancing at work: the demo's warm-up of the tiny DeepSeek-V3 with the routing
bias off and on (`train.routing_bias_gamma`), same seed and data.

Reports, per gamma, the final loss and the expert load of the last 20 steps (max/mean tokens per
expert in the worst MoE layer; 1.0 is perfect balance). Last line: one JSON object.

    python benchmarks/routing_balance_cpu.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from grpo.config import recipe_from_dict
from grpo.sft import sft

GAMMAS = (0.0, 0.001, 0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for gamma in GAMMAS:
            recipe = recipe_from_dict(
                {
                    "run": {"name": f"gamma-{gamma}", "output_dir": scratch},
                    "model": {"path": "tiny:deepseek_v3"},
                    "sft": {"steps": args.steps, "batch_size": 32, "learning_rate": 3e-3},
                    "train": {"threads": 2, "routing_bias_gamma": gamma},
                }
            )
            summary = sft(recipe, log=lambda line, gamma=gamma: print(f"[gamma {gamma}] {line}", flush=True))
            rows.append(
                {
                    "gamma": gamma,
                    "final_loss": round(summary["final_loss"], 5),
                    "expert_load_max_over_mean": round(summary["expert_load_max_over_mean"], 3),
                }
            )
    print(json.dumps({"benchmark": "routing_balance_cpu", "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
