"""The policy trainer's update alone on one GPU: `PolicyTrainer.train_step`'s trainer tokens/s with FP8
and BF16 GEMMs, in five settings that alternate on one trainer:
- `before`: as at 109b7e1, the backward on autograd's device thread
  (`PolicyTrainer.backward_on_this_thread` off) and the FP8 quantizers launched through Triton's JIT
  dispatch (`probe_fp8_step_cpu_gpu.quantizer_launch`);
- `this_thread`: the backward on the calling thread, the launch as before;
- `now`: as the trainer runs now, the backward on the calling thread, the quantizers' compiled
  kernel launched directly, and one quantized copy of an input that two FP8 projections read
  (`grpo.models.fp8_activation_cache`; the three settings above quantize it for each);
- `now_unshared`: `now` without the shared copies;
- `now_no_gemm_add`: `now` with the dense layers' weight gradient stored by DeepGEMM and added into
  `.grad` by autograd, as before `fp8_deep_gemm.gemm_add_into` (only later micro-batches add).

Model: the H100 recipes' ~0.4 B-parameter DeepSeek-V3 MoE (`recipes/arithmetic_sft_h100.yaml`'s
`tiny_overrides`) at random initialization, trained as `recipes/arithmetic_grpo_h100.yaml` says, on
a synthetic rollout batch of that recipe's size: 64 prompts x 8 completions, 16 prompt and 64
completion tokens each, random token ids and advantages; learning rate 1e-30, too small to move
any weight, so that the weights (and with them the routing, and so the experts' work) stay the same
from step to step while every step still does all of its work, optimizer included. No vLLM, no
Ray: the update alone, which `benchmarks/loop_breakdown.py` reports as `train_s` inside the loop.
For each micro-batch size and precision one trainer is built, then the settings take turns,
`--rounds` times `STEPS` steps each after a warm-up step; the figure is the median step's tokens/s
(every step's figure is kept in `steps_tokens_per_s`). With `--profile`, each trainer's
last step (as it runs now) also runs under cProfile, and the functions with the most own time per
step are printed. Last line: one JSON object.

    python3 benchmarks/trainer_step_gpu.py [--micro-batch-sizes 512 128] [--rounds 2] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import statistics
import tempfile
from pathlib import Path

import torch
from fp8_mlp_gpu import unshared
from probe_fp8_step_cpu_gpu import own_time_lines, quantizer_launch

from grpo.config import load_recipe
from grpo.models import fp8_deep_gemm
from grpo.models.build import materialize
from grpo.trainer.policy_trainer import PolicyTrainer, RolloutBatch

PROMPTS, GROUP, PROMPT_TOKENS, COMPLETION_TOKENS = 64, 8, 16, 64
STEPS = 3
PAD = 0


def h100_model(scratch: Path) -> tuple[str, dict, int]:
    """The H100 recipes' model written under `scratch` at random initialization, the GRPO recipe as a
    dict (its `model.path` that model) for the caller to adjust, and the vocabulary size."""
    sft = load_recipe("recipes/arithmetic_sft_h100.yaml")
    grpo = load_recipe("recipes/arithmetic_grpo_h100.yaml").model_dump()
    path = materialize(sft.model.path, scratch, tiny_overrides=sft.model.tiny_overrides)
    grpo["model"]["path"] = path
    return path, grpo, json.loads((Path(path) / "config.json").read_text())["vocab_size"]


def rollout_batch(vocab_size: int) -> RolloutBatch:
    generator = torch.Generator().manual_seed(0)
    rows = PROMPTS * GROUP

    def ids(length: int) -> list[list[int]]:
        return torch.randint(3, vocab_size, (rows, length), generator=generator).tolist()

    advantages = torch.randn(rows, generator=generator).tolist()
    return RolloutBatch(ids(PROMPT_TOKENS), ids(COMPLETION_TOKENS), advantages, [[] for _ in range(rows)])


SETTINGS = {
    "before": (False, False, False, False),
    "this_thread": (False, True, False, False),
    "now": (True, True, True, True),
    "now_unshared": (True, True, False, True),
    "now_no_gemm_add": (True, True, True, False),
}
"""name -> (quantizer kernels launched directly, backward on the calling thread, activation copies
shared, the dense layers' weight gradient added into `.grad` by DeepGEMM's GEMM)"""


@contextlib.contextmanager
def gemm_adds(on: bool):
    """`fp8_deep_gemm`'s adding GEMM left as loaded, or refused (autograd then adds, as before)."""
    kept = fp8_deep_gemm.adds_into_d
    fp8_deep_gemm.adds_into_d = kept and on
    try:
        yield
    finally:
        fp8_deep_gemm.adds_into_d = kept


def tokens_per_s(trainer: PolicyTrainer, batch: RolloutBatch, setting: str) -> list[float]:
    launch_directly, trainer.backward_on_this_thread, shared, adds = SETTINGS[setting]
    with (
        quantizer_launch(launch_directly),
        contextlib.nullcontext() if shared else unshared(),
        gemm_adds(adds),
    ):
        return [trainer.train_step(batch, 1)["trainer_tokens_per_s"] for _ in range(STEPS)]


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[512, 128])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        path, grpo, vocab_size = h100_model(Path(scratch))
        batch = rollout_batch(vocab_size)
        for micro_batch_size in args.micro_batch_sizes:
            for fp8 in (True, False):
                grpo["model"]["fp8"] = fp8
                grpo["train"].update(micro_batch_size=micro_batch_size, learning_rate=1e-30)
                trainer = PolicyTrainer(path, grpo, PAD)
                trainer.train_step(batch, 1)  # warm-up: Triton compiles, cuBLASLt picks its kernels
                runs: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
                for _ in range(args.rounds):
                    for setting in SETTINGS:
                        runs[setting] += tokens_per_s(trainer, batch, setting)
                row = {"fp8": fp8, "micro_batch_size": micro_batch_size}
                row.update(
                    {f"tokens_per_s_{name}": round(statistics.median(runs[name])) for name in SETTINGS}
                )
                row["steps_tokens_per_s"] = {name: [round(v) for v in runs[name]] for name in SETTINGS}
                for name in ("this_thread", "now"):
                    row[f"{name}_over_before"] = round(
                        row[f"tokens_per_s_{name}"] / row["tokens_per_s_before"], 3
                    )
                row["now_over_now_unshared"] = round(
                    row["tokens_per_s_now"] / row["tokens_per_s_now_unshared"], 3
                )
                row["now_over_now_no_gemm_add"] = round(
                    row["tokens_per_s_now"] / row["tokens_per_s_now_no_gemm_add"], 3
                )
                row["gemm_adds_into_grad"] = fp8_deep_gemm.adds_into_d
                rows.append(row)
                print(row, flush=True)
                if args.profile:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    trainer.train_step(batch, 1)
                    profiler.disable()
                    print(*own_time_lines(profiler, calls=1, lines=25), sep="\n", flush=True)
                trainer.close()
                del trainer
                torch.cuda.empty_cache()
    print(json.dumps({"benchmark": "trainer_step_gpu", "device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()
