"""Whether `grpo.models.fp8_warm_up` asks for the GEMM shapes a real run compiled, checked on the CPU.

Builds the H100 recipes' ~0.4 B MoE (`recipes/arithmetic_sft_h100.yaml`'s `tiny_overrides`, random
weights) in FP8 as `grpo train` does, lists the warm-up's jobs for session 34's token cap (4,096
tokens), and compares their shapes with the kernels of a DeepGEMM cache listing
(`deep_gemm_cache_list.py`'s lines; by default session 37's, the H100 loop's first step on a fresh
machine). A kernel's compiled sides are N and K (K 0 for a weight gradient, which reads its token
count at run time) and the groups (the routed experts' count, for a grouped GEMM). A dense job of
shape (N, K) stands for the kernel "N K groups 1"; with its backward, also for the weight gradient's
"N=K K 0"; a grouped job for "N K groups E". The row counts are not in a listing: the GPU test
`test_after_the_warm_up_no_token_count_compiles_a_kernel` checks those.

The experts are taken to run through DeepGEMM, as on the H100 (on the CPU it does not load).

    python3 benchmarks/probe_warm_up_jobs.py [LISTING]

Last line: one JSON object, with the shapes on one side only (both lists empty: they agree).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from unittest import mock

from trainer_step_gpu import h100_model

from grpo.config import Recipe
from grpo.models.build import converters_for, load_policy
from grpo.models.fp8_warm_up import Job, jobs_for
from grpo.models.moe import GroupedExperts

LISTING = Path(__file__).parent / "results" / "deep_gemm_kernels_token_cap_h100.txt"
TOKEN_CAP = 4096
KERNEL = re.compile(r"\bN (\d+) K (\d+) groups (\d+) ")


def listed_shapes(listing: Path) -> set[tuple[int, int, int]]:
    """(N, K, groups) of each kernel line of a `deep_gemm_cache_list.py` listing."""
    return {tuple(map(int, found.groups())) for found in KERNEL.finditer(listing.read_text())}


def job_shapes(jobs: list[Job]) -> set[tuple[int, int, int]]:
    """The (N, K, groups) kernels the jobs compile, the row-count choices aside."""
    shapes = set()
    for job in jobs:
        shapes.add((job.out_features, job.in_features, job.experts or 1))
        if job.backward and not job.experts:  # the experts' weight gradient is a Triton kernel
            shapes.add((job.in_features, 0, 1))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("listing", nargs="?", type=Path, default=LISTING)
    args = parser.parse_args()
    if not args.listing.is_file():
        parser.exit(2, f"probe_warm_up_jobs: no listing at {args.listing}\n")
    with tempfile.TemporaryDirectory() as scratch:
        path, grpo, _ = h100_model(Path(scratch))
        grpo["model"]["fp8"] = True
        model = load_policy(path, grpo["model"]["dtype"], converters_for(Recipe.model_validate(grpo).model))
    with mock.patch.object(GroupedExperts, "deep_gemm", lambda self, weight: "DeepGEMM"):
        jobs = jobs_for(model, TOKEN_CAP)
    for job in jobs:
        print(job)
    listed, asked = listed_shapes(args.listing), job_shapes(jobs)
    print(
        json.dumps(
            {
                "benchmark": "probe_warm_up_jobs",
                "listing": args.listing.name,
                "jobs": len(jobs),
                "listed_shapes": len(listed),
                "job_shapes": len(asked),
                "listed_not_asked": sorted(listed - asked),
                "asked_not_listed": sorted(asked - listed),
            }
        )
    )


if __name__ == "__main__":
    main()
