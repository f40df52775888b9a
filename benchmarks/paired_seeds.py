"""Paired statistics over seeds of `fp8_vs_bf16_sft.py` runs: how one variant's final loss differs
from another's on the same seeds, as the results file reports it.

Reads the JSON lines `fp8_vs_bf16_sft.py` prints (a run's last line) from the given files; in a results
file with `# ---- ...` section headers, `--section TEXT` keeps the sections whose header contains TEXT
(repeatable; a seed found twice keeps its first value). For each seed with both variants: the signed
difference `variant - baseline`; printed are the per-seed percentages, the two means, the mean
difference over the mean baseline, its 95% t interval, and how many seeds have the variant higher.
Last line: one JSON object.

    python benchmarks/paired_seeds.py benchmarks/results/fp8_vs_bf16_sft_cpu.txt \\
        --section "session 11" --variant fp8_bf16_masters --baseline bf16_masters [--metric held_out_loss]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

T_975_SMALL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365}
"""Two-sided 95% quantiles of Student's t for 1-7 degrees of freedom (standard tables)."""


def t_975(df: int) -> float:
    """Student's t 0.975 quantile: the table for df < 8, else Abramowitz & Stegun 26.7.5's expansion
    around the normal quantile (within 0.0005 of the exact value for df >= 8)."""
    if df in T_975_SMALL:
        return T_975_SMALL[df]
    z = 1.959964
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def runs(paths: list[str], sections: list[str]) -> list[dict]:
    found = []
    for path in paths:
        keep = not sections
        with open(path) as lines:
            for line in lines:
                if line.startswith("# ----"):
                    keep = not sections or any(text in line for text in sections)
                elif keep and line.startswith("{") and '"fp8_vs_bf16_sft"' in line:
                    found.append(json.loads(line))
    return found


def per_seed(found: list[dict], key: str) -> dict[int, float]:
    values: dict[int, float] = {}
    for run in found:
        if key in run:
            values.setdefault(run["seed"], run[key])
    return values


def paired(variant: dict[int, float], baseline: dict[int, float]) -> dict:
    seeds = sorted(set(variant) & set(baseline))
    if len(seeds) < 2:
        raise SystemExit(f"paired_seeds: {len(seeds)} seed(s) with both variants; need 2 or more")
    diffs = [variant[s] - baseline[s] for s in seeds]
    mean_baseline = statistics.fmean(baseline[s] for s in seeds)
    mean_diff = statistics.fmean(diffs)
    half = t_975(len(seeds) - 1) * statistics.stdev(diffs) / math.sqrt(len(seeds))
    return {
        "seeds": seeds,
        "per_seed_percent": [round(100 * (variant[s] - baseline[s]) / baseline[s], 2) for s in seeds],
        "mean_variant": round(statistics.fmean(variant[s] for s in seeds), 5),
        "mean_baseline": round(mean_baseline, 5),
        "difference_percent": round(100 * mean_diff / mean_baseline, 2),
        "interval_percent": [
            round(100 * (mean_diff - half) / mean_baseline, 2),
            round(100 * (mean_diff + half) / mean_baseline, 2),
        ],
        "variant_higher": sum(d > 0 for d in diffs),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+")
    parser.add_argument("--section", action="append", default=[])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--metric", default="held_out_loss", choices=["held_out_loss", "loss"])
    args = parser.parse_args()
    found = runs(args.files, args.section)
    variant, baseline = (per_seed(found, f"{args.metric}_{name}") for name in (args.variant, args.baseline))
    result = paired(variant, baseline)
    low, high = result["interval_percent"]
    print(
        f"{args.metric}, {args.variant} vs {args.baseline}, seeds {result['seeds'][0]}-{result['seeds'][-1]} "
        f"(n={len(result['seeds'])}): {' '.join(f'{p:+.2f}' for p in result['per_seed_percent'])} %"
    )
    print(
        f"  -> means {result['mean_variant']:.5f} vs {result['mean_baseline']:.5f}, "
        f"{result['difference_percent']:+.2f}%, interval {low:+.2f}% .. {high:+.2f}%, "
        f"higher in {result['variant_higher']} of {len(result['seeds'])}"
    )
    print(json.dumps({"benchmark": "paired_seeds", "metric": args.metric, "variant": args.variant,
                      "baseline": args.baseline, **result}))  # fmt: skip


if __name__ == "__main__":
    main()
