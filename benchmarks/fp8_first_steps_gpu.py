"""The FP8 trainer's first steps on a fresh Hopper machine, with DeepGEMM compiling the weight
gradient's K, a token count, into its kernel (`before`: DeepGEMM's default, `compiled_dims="nk"`) or
reading it at run time (`now`: `fp8_deep_gemm.TOKEN_REDUCTION_COMPILED_DIMS`, "n"), `now` with
DeepGEMM compiling through NVRTC instead of nvcc (`now_nvrtc`: `DG_JIT_USE_NVRTC=1`; on CUDA 13 vLLM 0.26's
DeepGEMM does not compile through NVRTC, and the setting measures the trainer on cuBLASLt: session 36,
`results/fp8_linear_h200.txt`), and `now` with the trainer compiling the kernels ahead, in processes
side by side (`warm_up`: `train.fp8_warm_up`, `grpo.models.fp8_warm_up`; off in the other settings),
and `warm_up` again on the caches the `warm_up` setting filled (`warm_up_again`, run after it: what
the warm-up costs every later run on one machine).

Part 1, the trainer. Each setting runs in a process of its own with empty DeepGEMM and Triton caches
(`DG_JIT_CACHE_DIR`, `TRITON_CACHE_DIR`), as on a fresh machine (`warm_up_again`: the `warm_up`
setting's). It builds the H100 recipes' ~0.4 B
MoE at random initialization (`recipes/arithmetic_sft_h100.yaml`'s `tiny_overrides`) and trains it
as `recipes/arithmetic_grpo_h100.yaml` says, with session 34's token cap
(`train.micro_batch_tokens: 4096`, `micro_batch_size: 128`), on STEPS synthetic rollout batches of
64 x 8 rows. Each row's prompt (8-24 tokens) and completion (1-64) lengths are drawn at random, so
the micro-batches' token counts differ as a real step's do. The learning rate is 1e-30, so the
weights and the routing stay put. Then it trains on the same batches a second time. Reported: the
trainer's construction (`init_s`: loading the model, and the warm-up where on), each step's wall
seconds in both passes, and the DeepGEMM kernels (`.cubin` files) in the cache after the
construction and after each step of the first pass.

Part 2, the GEMM. DeepGEMM's weight gradient alone at DeepSeek-V3's three dense shapes (8192 tokens;
operands from the fused quantizers), K compiled in or not, in alternating order: device time per
call (`torch.profiler`, mean of CALLS calls, each setting timed twice) and whether the two products
are bitwise equal. Last line: one JSON object.

    python3 benchmarks/fp8_first_steps_gpu.py [--steps 3] [--settings before now now_nvrtc warm_up warm_up_again] [--no-gemm]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from cuda_timing import kernel_us_per_call
from probe_deep_gemm_configs_gpu import gemms
from trainer_step_gpu import h100_model

from grpo.models import fp8_deep_gemm
from grpo.trainer.policy_trainer import PolicyTrainer, RolloutBatch

SETTINGS = {
    "before": ("nk", False, False),
    "now": ("n", False, False),
    "now_nvrtc": ("n", True, False),
    "warm_up": ("n", False, True),
    "warm_up_again": ("n", False, True),
}
"""name -> (the sides compiled into a weight gradient's kernel, whether DeepGEMM compiles through NVRTC,
whether the trainer compiles the kernels ahead)"""
GEMM_SETTINGS = ("before", "now")
"""Part 2's, in this process's compiler (nvcc, unless the environment says NVRTC)."""
PROMPTS, GROUP = 64, 8
TOKEN_CAP, MICRO_BATCH_ROWS = 4096, 128
SHAPES = [(7168, 2048), (2048, 7168), (7168, 18432)]
CALLS = 20


def rollout_batch(vocab_size: int, seed: int) -> RolloutBatch:
    """64 x 8 rows of random ids, each with its own prompt and completion length."""
    draw = random.Random(seed)
    rows = PROMPTS * GROUP

    def ids(low: int, high: int) -> list[list[int]]:
        return [[draw.randrange(3, vocab_size) for _ in range(draw.randint(low, high))] for _ in range(rows)]

    prompts, completions = ids(8, 24), ids(1, 64)
    return RolloutBatch(
        prompts, completions, [draw.gauss(0, 1) for _ in range(rows)], [[] for _ in range(rows)]
    )


def kernels_compiled(cache: Path) -> int:
    return sum(1 for _ in cache.rglob("*.cubin"))


def trainer_steps(setting: str, steps: int, cache: Path) -> dict:
    """Part 1 in this process: DeepGEMM's and Triton's caches are the environment's, empty."""
    fp8_deep_gemm.TOKEN_REDUCTION_COMPILED_DIMS = SETTINGS[setting][0]
    with tempfile.TemporaryDirectory() as scratch:
        path, grpo, vocab_size = h100_model(Path(scratch))
        grpo["model"]["fp8"] = True
        grpo["train"].update(
            micro_batch_size=MICRO_BATCH_ROWS,
            micro_batch_tokens=TOKEN_CAP,
            learning_rate=1e-30,
            fp8_warm_up=SETTINGS[setting][2],
        )
        start = time.perf_counter()
        trainer = PolicyTrainer(path, grpo, 0)
        init_s = round(time.perf_counter() - start, 1)
        kernels_after_init = kernels_compiled(cache)
        print(setting, "trainer built in", init_s, "s,", kernels_after_init, "kernels", flush=True)
        batches = [rollout_batch(vocab_size, seed) for seed in range(steps)]
        first, second, kernels = [], [], []
        for batch in batches:
            start = time.perf_counter()
            trainer.train_step(batch, 1)
            torch.cuda.synchronize()
            first.append(round(time.perf_counter() - start, 2))
            kernels.append(kernels_compiled(cache))
            print(setting, "first pass", first[-1], "s,", kernels[-1], "kernels", flush=True)
        for batch in batches:
            start = time.perf_counter()
            trainer.train_step(batch, 1)
            torch.cuda.synchronize()
            second.append(round(time.perf_counter() - start, 2))
        trainer.close()
    return {
        "setting": setting,
        "compiled_dims": SETTINGS[setting][0],
        "nvrtc": SETTINGS[setting][1],
        "warm_up": trainer.warm_up_report,
        "init_s": init_s,
        "deep_gemm_kernels_after_init": kernels_after_init,
        "first_pass_step_s": first,
        "second_pass_step_s": second,
        "deep_gemm_kernels_after_step": kernels,
        "gemm_adds_into_grad": fp8_deep_gemm.adds_into_d,
    }


def in_fresh_process(setting: str, steps: int, scratch: Path) -> dict:
    cached = setting.removesuffix("_again")  # whose caches: its own, empty, but for `warm_up_again`
    caches = {
        "DG_JIT_CACHE_DIR": scratch / f"deep_gemm_{cached}",
        "TRITON_CACHE_DIR": scratch / f"triton_{cached}",
    }
    env = dict(os.environ, **{name: str(folder) for name, folder in caches.items()})
    env["DG_JIT_USE_NVRTC"] = "1" if SETTINGS[setting][1] else "0"
    command = [sys.executable, __file__, "--trainer-setting", setting, "--steps", str(steps)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:  # NVRTC missing, say: the other settings still report
        return {"setting": setting, "error": f"exit code {done.returncode}; its stderr is above"}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["process_s"] = round(time.perf_counter() - start, 1)
    return row


def weight_gradient_gemms() -> list[dict]:
    """Part 2 in this process (its own kernel cache, set before DeepGEMM loads)."""
    library = fp8_deep_gemm.library(torch.device("cuda"))
    assert library is not None, "DeepGEMM does not load here"
    torch.manual_seed(0)
    rows = []
    for fan_in, fan_out in SHAPES:
        operands = gemms(fan_in, fan_out)["weight_grad"]

        def weight_gradient(operands=operands):
            return fp8_deep_gemm.gemm(*operands, torch.bfloat16, reduces_over_tokens=True)

        products, us = {}, {setting: [] for setting in GEMM_SETTINGS}
        for setting in [*GEMM_SETTINGS, *reversed(GEMM_SETTINGS)]:
            fp8_deep_gemm.TOKEN_REDUCTION_COMPILED_DIMS = SETTINGS[setting][0]
            products[setting] = weight_gradient()
            us[setting].append(kernel_us_per_call(weight_gradient, CALLS))
        row = {"shape": f"8192x{fan_in}->{fan_out}"}
        row.update({f"{setting}_us": [round(v, 1) for v in us[setting]] for setting in GEMM_SETTINGS})
        row["now_over_before"] = round(min(us["now"]) / min(us["before"]), 3)
        row["bitwise_equal"] = torch.equal(products["before"], products["now"])
        rows.append(row)
        print(row, flush=True)
    fp8_deep_gemm.TOKEN_REDUCTION_COMPILED_DIMS = SETTINGS["now"][0]
    return rows


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--no-gemm", action="store_true", help="part 1 only")
    parser.add_argument("--trainer-setting", choices=list(SETTINGS), help="run part 1's setting here")
    args = parser.parse_args()
    if args.trainer_setting:
        print(
            json.dumps(trainer_steps(args.trainer_setting, args.steps, Path(os.environ["DG_JIT_CACHE_DIR"])))
        )
        return
    with tempfile.TemporaryDirectory() as scratch:
        trainer_rows = [in_fresh_process(setting, args.steps, Path(scratch)) for setting in args.settings]
        os.environ["DG_JIT_CACHE_DIR"] = str(Path(scratch) / "deep_gemm_gemms")
        gemm_rows = [] if args.no_gemm else weight_gradient_gemms()
    done = [row for row in trainer_rows if "error" not in row]
    first = {row["setting"]: sum(row["first_pass_step_s"]) for row in done}
    built_and_first = {row["setting"]: row["init_s"] + sum(row["first_pass_step_s"]) for row in done}
    print(
        json.dumps(
            {
                "benchmark": "fp8_first_steps_gpu",
                "device": torch.cuda.get_device_name(),
                "first_pass_s": {setting: round(s, 1) for setting, s in first.items()},
                "init_and_first_pass_s": {setting: round(s, 1) for setting, s in built_and_first.items()},
                "first_pass_over_before": {
                    setting: round(s / first["before"], 3) for setting, s in first.items()
                }
                if "before" in first
                else {},
                "trainer": trainer_rows,
                "weight_gradient_gemm": gemm_rows,
            }
        )
    )


if __name__ == "__main__":
    main()
