"""Supervised warm-up of the demo's tiny DeepSeek-V3 in FP8 against BF16 (and FP32), same seed.

Runs `grpo sft` on the arithmetic task with identical data order and initialisation, once per variant:
- `fp32`: FP32 weights and GEMMs;
- `bf16`: BF16 weights and GEMMs, no master copy (updates below a BF16 ulp are lost);
- `fp8`: FP32 weights, every linear layer but embedding/head/router/norms in FP8 GEMMs;
- `bf16_masters`: BF16 weights and GEMMs, FP32 master weights and BF16 Adam moments
  (`train.bf16_moments`), DeepSeek-V3's BF16 baseline;
- `fp8_bf16_masters`: the same with FP8 GEMMs, DeepSeek-V3's FP8 recipe: the pair differs only in
  the GEMMs' precision;
- `fp8_forward_bf16_masters`: FP8 in the forward GEMM only, the two backward GEMMs in BF16 on the
  unquantized operands (an ablation: how much of the pair's gap the backward's FP8 makes);
- `fp8_wgrad_bf16_bf16_masters`: FP8 in the forward and input-gradient GEMMs, the weight gradient in
  BF16 on the unquantized operands (an ablation: its FP8 error grows as training goes deep,
  `results/fp8_gemm_error_cpu.txt`);
- `fp8_forward_weight_only_bf16_masters` and `fp8_forward_activation_only_bf16_masters`: as
  `fp8_forward_bf16_masters`, with only one operand of the forward GEMM through its FP8 quantizer
  and back, the other exact (an ablation: whether the forward's gap comes from the weights' rounding,
  which training cannot move below E4M3's step, or from the activations');
- `fp8_no_attention_bf16_masters`: FP8 GEMMs except in the attention projections, which stay BF16
  (`model.fp8_exclude: [self_attn]`; an ablation: how much of the pair's gap the attention's FP8 makes);
- `fp8_no_qkv_a_bf16_masters`: FP8 GEMMs except in the two projections that read the attention's
  input (`model.fp8_exclude: [q_a_proj, kv_a_proj_with_mqa]`), which vLLM fuses into one layer and
  `grpo export-fp8` keeps in BF16 anyway (576 rows are not whole blocks); they carry most of the
  attention's FP8 forward effect (`fp8_forward_effect_by_part.py`);
- `fp8_no_q_b_kv_b_o_bf16_masters`: the other three attention projections in BF16
  (`model.fp8_exclude: [q_b_proj, kv_b_proj, o_proj]`), the complement of the one above.
Reports two final losses and, for the pairs run, their signed relative differences (variant -
baseline) / baseline:
- `loss`: the training loss, mean of the last 20 steps (each step a different batch);
- `held_out_loss`: the final weights' mean completion-token NLL on the same 512 held-out problems for
  every run, in an FP32 forward of transformers' own model (no FP8, no project layers): it compares
  the trained weights without the batch-to-batch noise of the training loss;
- `fp8_forward_effect`: on each run's final weights, the held-out loss with the project's layers in
  FP8 GEMMs against the same layers in BF16 GEMMs, relative: what FP8 changes in the loss of one
  model, free of the divergence between two training runs.
Target from the FP8 issue: FP8 within 1% of BF16. On a machine with a CUDA GPU, `grpo sft` trains there
(real FP8 GEMMs; the held-out evaluations stay on the CPU): `results/fp8_vs_bf16_sft_h200.txt`.
Last line: one JSON object.

    python benchmarks/fp8_vs_bf16_sft.py [--steps 300] [--seed 0] [--threads 2] [--lr 3e-3]
        [--variants fp32,bf16,fp8] [--tiny hidden_size=512 ...] [--eval-device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from unittest import mock

import torch

from grpo.config import RecipeError, recipe_from_dict
from grpo.data import eval_prompts
from grpo.models import fp8 as fp8_layers
from grpo.models import moe
from grpo.models.build import converters_for, load_policy, load_tokenizer
from grpo.sft import sft
from grpo.tasks.arithmetic import solution_text
from grpo.trainer.policy_trainer import pack, token_logprobs

VARIANTS = {  # (model options, train options)
    "fp32": ({"dtype": "float32"}, {}),
    "bf16": ({"dtype": "bfloat16"}, {}),
    "fp8": ({"dtype": "float32", "fp8": True}, {}),
    "bf16_masters": ({"dtype": "bfloat16"}, {"bf16_moments": True}),
    "fp8_bf16_masters": ({"dtype": "bfloat16", "fp8": True}, {"bf16_moments": True}),
    "fp8_forward_bf16_masters": ({"dtype": "bfloat16", "fp8": True}, {"bf16_moments": True}),
    "fp8_wgrad_bf16_bf16_masters": ({"dtype": "bfloat16", "fp8": True}, {"bf16_moments": True}),
    "fp8_forward_weight_only_bf16_masters": ({"dtype": "bfloat16", "fp8": True}, {"bf16_moments": True}),
    "fp8_forward_activation_only_bf16_masters": ({"dtype": "bfloat16", "fp8": True}, {"bf16_moments": True}),
    "fp8_no_attention_bf16_masters": (
        {"dtype": "bfloat16", "fp8": True, "fp8_exclude": ["self_attn"]},
        {"bf16_moments": True},
    ),
    "fp8_no_qkv_a_bf16_masters": (
        {"dtype": "bfloat16", "fp8": True, "fp8_exclude": ["q_a_proj", "kv_a_proj_with_mqa"]},
        {"bf16_moments": True},
    ),
    "fp8_no_q_b_kv_b_o_bf16_masters": (
        {"dtype": "bfloat16", "fp8": True, "fp8_exclude": ["q_b_proj", "kv_b_proj", "o_proj"]},
        {"bf16_moments": True},
    ),
}
# (variant, baseline): relative difference of the first's final loss from the second's
PAIRS = [
    ("fp8", "bf16"),
    ("fp8", "fp32"),
    ("bf16", "fp32"),
    ("fp8_bf16_masters", "bf16_masters"),
    ("fp8_forward_bf16_masters", "bf16_masters"),
    ("fp8_wgrad_bf16_bf16_masters", "bf16_masters"),
    ("fp8_forward_weight_only_bf16_masters", "bf16_masters"),
    ("fp8_forward_activation_only_bf16_masters", "bf16_masters"),
    ("fp8_no_attention_bf16_masters", "bf16_masters"),
    ("fp8_no_qkv_a_bf16_masters", "bf16_masters"),
    ("fp8_no_q_b_kv_b_o_bf16_masters", "bf16_masters"),
]


HELD_OUT = 512


def forward_only(forward_gemm):
    """An autograd function for `x @ w.T` whose forward is `forward_gemm(x, w, power_of_two)` and
    whose two backward GEMMs run in the operands' own precision on the unquantized operands."""

    class ForwardOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x_MK, w_NK, power_of_two: bool):
            ctx.save_for_backward(x_MK, w_NK)
            ctx.power_of_two = power_of_two
            with torch.no_grad():
                return forward_gemm(x_MK, w_NK, power_of_two)

        @staticmethod
        def backward(ctx, grad_MN):
            x_MK, w_NK = ctx.saved_tensors
            grad_MN = grad_MN.to(x_MK.dtype)
            return grad_MN @ w_NK, grad_MN.t() @ x_MK, None

    return ForwardOnly


def dequantized(x: torch.Tensor, layout: str | None, power_of_two: bool = False) -> torch.Tensor:
    """`x` through the project's quantizer for `layout` and back (`tiles`: 1 x 128 along a row;
    `blocks`: 128 x 128), or as it is (None)."""
    if layout is None:
        return x
    if layout == "tiles":
        back = fp8_layers.dequantize_tiles(*fp8_layers.quantize_tiles(x, power_of_two))
    else:
        back = fp8_layers.dequantize_blocks(*fp8_layers.quantize_blocks(x, power_of_two))
    return fp8_layers.trimmed(back, *x.shape)


def fp8_rounded_operands(x_layout: str | None, w_layout: str | None):
    """A forward GEMM `x @ w.T` on the operands through their quantizers and back (a layout of None
    leaves that operand exact): FP32 products and sums, the output in `x`'s dtype."""

    def gemm(x_MK, w_NK, power_of_two: bool):
        x_rounded_MK = dequantized(x_MK, x_layout, power_of_two).float()
        w_rounded_NK = dequantized(w_NK, w_layout, power_of_two).float()
        return (x_rounded_MK @ w_rounded_NK.t()).to(x_MK.dtype)

    return gemm


Fp8ForwardOnly = forward_only(fp8_layers.fp8_linear)
"""`x @ w.T` with the forward in FP8 and both backward GEMMs in the operands' own precision."""


class Fp8WeightGradientInBf16(Fp8ForwardOnly):
    """`x @ w.T` with the forward (`Fp8ForwardOnly`'s) and the input gradient in FP8 (the recipe's
    quantizers and GEMM), the weight gradient in the operands' own precision."""

    @staticmethod
    def backward(ctx, grad_MN):
        x_MK, w_NK = ctx.saved_tensors
        grad_MN = grad_MN.to(x_MK.dtype)
        # grad @ w as the layer's own forward GEMM on w.T (in 128 x 128 blocks, the same bytes as
        # the recipe's transposed copy); a copy of its own, so no cached copy of w can answer for it
        grad_x_MK = fp8_layers.fp8_linear(grad_MN, w_NK.t().contiguous(), ctx.power_of_two)
        return grad_x_MK, grad_MN.t() @ x_MK, None


LINEAR_FUNCTION = {
    "fp8_forward_bf16_masters": Fp8ForwardOnly,
    "fp8_forward_weight_only_bf16_masters": forward_only(fp8_rounded_operands(None, "blocks")),
    "fp8_forward_activation_only_bf16_masters": forward_only(fp8_rounded_operands("tiles", None)),
    "fp8_wgrad_bf16_bf16_masters": Fp8WeightGradientInBf16,
}
"""The variants whose FP8 layers run another autograd function than the recipe's."""


def linear_function_of(name: str):
    """Every FP8 linear and every FP8 expert through the variant's function in `LINEAR_FUNCTION` for
    the duration, if it has one. The experts run through `fp8_linear` one at a time (on the CPU they
    always do; on a GPU this replaces the recipe's grouped kernels, so that the ablation means the
    same on both)."""
    if name not in LINEAR_FUNCTION:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(fp8_layers, "Fp8LinearFunction", LINEAR_FUNCTION[name]))
    stack.enter_context(mock.patch.object(moe, "grouped_linear", experts_one_at_a_time))
    stack.enter_context(mock.patch.object(moe.GroupedExperts, "_deep_gemm", lambda self, x: None))
    return stack


def experts_one_at_a_time(x_NK, w_EOK, offsets_E, fp8: bool, grouped_linear=moe.grouped_linear):
    """`moe.grouped_linear` with its FP8 experts through `fp8_linear`, one per expert, on any device."""
    if fp8:
        return moe.per_expert_fp8(x_NK, w_EOK, offsets_E)
    return grouped_linear(x_NK, w_EOK, offsets_E, fp8)


def packed_problems(tokenizer, rows):
    """Arithmetic problems with their boxed worked solutions, packed as `grpo sft` packs them."""
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    completions = [
        tokenizer(solution_text(row["expression"], boxed=True))["input_ids"] + [tokenizer.eos_token_id]
        for row in rows
    ]
    return pack(prompts, completions, tokenizer.pad_token_id or 0)


@torch.no_grad()
def held_out_loss(checkpoint: str, recipe, gemms: str = "fp32", device: str = "cpu") -> float:
    """Mean completion-token NLL of `checkpoint` on HELD_OUT held-out problems (the same set for every
    run and seed), as `grpo sft` computes its loss. `gemms`: `fp32`, transformers' own model in FP32;
    `bf16` or `fp8`, the project's layers (the recipe's MoE layer) on BF16 weights, GEMMs in BF16 or
    FP8; evaluated on `device`."""
    tokenizer = load_tokenizer(checkpoint)
    if gemms == "fp32":
        model = load_policy(checkpoint, "float32")
    else:
        layers = recipe.model.model_copy(update={"dtype": "bfloat16", "fp8": gemms == "fp8"})
        model = load_policy(checkpoint, "bfloat16", converters_for(layers))
    model.to(device).eval()
    rows = eval_prompts(recipe.data, HELD_OUT, seed=0)
    nll, tokens = 0.0, 0
    for start in range(0, len(rows), 64):
        packed = packed_problems(tokenizer, rows[start : start + 64]).to(device)
        logp_BL1, _ = token_logprobs(model, packed)
        nll -= (logp_BL1 * packed.completion_mask_BL1).sum().item()
        tokens += int(packed.completion_mask_BL1.sum().item())
    return nll / tokens


def variant_recipe(
    name: str, output_dir: str, seed: int, steps: int, lr: float, threads: int, tiny_overrides: dict
):
    """The warm-up recipe of variant `name`: the same data, order and initialization for every one."""
    model, train = VARIANTS[name]
    return recipe_from_dict(
        {
            "run": {"name": name, "output_dir": output_dir, "seed": seed},
            "model": {"path": "tiny:deepseek_v3", "tiny_overrides": tiny_overrides, **model},
            "sft": {"steps": steps, "batch_size": 32, "learning_rate": lr, "boxed_fraction": 1.0},
            "train": {"threads": threads, **train},
        }
    )


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
        "--lr",
        type=float,
        default=3e-3,
        help="learning rate (the demo's 3e-3 trains chaotically: see results)",
    )
    parser.add_argument(
        "--variants", default="fp32,bf16,fp8", help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--tiny",
        action="append",
        default=[],
        metavar="FIELD=INT",
        help="a size of the tiny model other than its default (model.tiny_overrides), e.g. hidden_size=512",
    )
    parser.add_argument(
        "--eval-device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the held-out losses are evaluated (a wider model's CPU evaluations would take "
        "longer than its training on a GPU)",
    )
    args = parser.parse_args()
    tiny_overrides = {}
    for item in args.tiny:
        field, _, value = item.partition("=")
        if not value.isdigit():
            parser.error(f"--tiny: {item!r} is not FIELD=INT")
        tiny_overrides[field] = int(value)
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        try:  # every recipe up front: a bad --tiny or --steps stops here, not after a variant's training
            recipes = {
                name: variant_recipe(
                    name, scratch, args.seed, args.steps, args.lr, args.threads, tiny_overrides
                )
                for name in names
            }
        except RecipeError as error:
            parser.error(str(error))
        for name, recipe in recipes.items():
            with linear_function_of(name):
                summary = sft(recipe, log=lambda line, name=name: print(f"[{name}] {line}", flush=True))
                checkpoint = summary["checkpoint"]
                bf16, fp8 = (
                    held_out_loss(checkpoint, recipe, gemms, args.eval_device) for gemms in ("bf16", "fp8")
                )
            results[name] = {
                "loss": summary["final_loss"],
                "held_out_loss": held_out_loss(checkpoint, recipe, "fp32", args.eval_device),
                "fp8_forward_effect": (fp8 - bf16) / bf16,
                "seconds": summary["wall_time_s"],
            }
    print(
        json.dumps(
            {
                "benchmark": "fp8_vs_bf16_sft",
                "steps": args.steps,
                "seed": args.seed,
                "threads": args.threads,
                "lr": args.lr,
                # only where they differ from the defaults, so that earlier lines read the same
                **({"tiny_overrides": tiny_overrides} if tiny_overrides else {}),
                **({"eval_device": args.eval_device} if args.eval_device != "cpu" else {}),
                **{f"loss_{k}": round(v["loss"], 5) for k, v in results.items()},
                **{f"held_out_loss_{k}": round(v["held_out_loss"], 5) for k, v in results.items()},
                **{f"fp8_forward_effect_{k}": round(v["fp8_forward_effect"], 5) for k, v in results.items()},
                **{f"seconds_{k}": round(v["seconds"], 1) for k, v in results.items()},
                **{
                    f"rel_diff_{metric}_{a}_vs_{b}": round(
                        (results[a][metric] - results[b][metric]) / results[b][metric], 5
                    )
                    for metric in ("loss", "held_out_loss")
                    for a, b in PAIRS
                    if a in results and b in results
                },
            }
        )
    )


if __name__ == "__main__":
    main()
