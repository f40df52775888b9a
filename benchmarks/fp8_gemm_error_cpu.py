"""How far each FP8 GEMM of a training step lands from the exact product, on a trained tiny model.

Where does FP8 training lose to BF16 (`fp8_vs_bf16_sft.py`)? End-to-end losses need many seeds to
resolve 1%; this measures the three GEMMs of every `Fp8Linear` directly, on the operands a real
step produces. It trains the demo's tiny DeepSeek-V3 with BF16 GEMMs (`bf16_masters`, as in
`fp8_vs_bf16_sft.py`), then runs one held-out batch through the trained model with FP8 switched off
and records each FP8-converted linear layer's input `x`, weight `w` and output gradient `g` (all
BF16, as the BF16 recipe has them). For each layer it computes, against the exact product of those
BF16 operands (FP64):
- `forward` x @ w.T, `input_grad` g @ w, `weight_grad` g.T @ x, each as a BF16 GEMM (FP32
  accumulation, BF16 output) and from the project's FP8 quantizers (the dequantized operands'
  product in FP64: the error is the quantization's);
- `weight_grad` with `x` quantized two ways: in 128 x 128 blocks of `x.T` (the project's layout)
  and in 128 x 1 tiles (one scale per channel per 128 tokens, DeepSeek-V3's layout, tried on branch
  `wgrad-x-tiles`: slower on the H100, see `benchmarks/results/fp8_gemm_error_cpu.txt`); with one
  operand exact (`fp8_g_only`, `fp8_x_only`: whose rounding it is); with the tokens sorted by
  gradient magnitude (`fp8_tokens_sorted`, `weight_gradient_ways`);
- `weight_grad_coherence`: ||g.T @ x|| / sqrt(sum over tokens m of ||g_m||^2 ||x_m||^2), how much the
  tokens' contributions to the weight gradient add up rather than cancel (1 for a random walk,
  sqrt(M) when all point alike). Rounding each contribution by a fixed relative amount leaves an
  error of about that amount times sqrt(sum ||g_m||^2 ||x_m||^2), so the weight gradient's relative
  error goes as 1 / coherence.
Errors are relative Frobenius norms, ||approx - exact|| / ||exact||, pooled over all layers (a sum of
squares) and per kind of layer (`q_a_proj`, `o_proj`, ...). The routed experts are not hooked (they
are not `nn.Linear`); their GEMMs quantize alike. Last line: one JSON object.

    python benchmarks/fp8_gemm_error_cpu.py [--steps 300] [--seed 0] [--lr 3e-4]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from fp8_vs_bf16_sft import dequantized, packed_problems

from grpo.config import recipe_from_dict
from grpo.data import eval_prompts
from grpo.models.build import converters_for, load_policy, load_tokenizer
from grpo.models.fp8 import Fp8Linear, high_precision
from grpo.sft import sft
from grpo.trainer.policy_trainer import token_logprobs


def capture_operands(model, packed) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, x_MK, w_NK, g_MN) of every `Fp8Linear`, from one forward and backward in BF16 GEMMs."""
    inputs, grads, handles = {}, {}, []
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    for name, module in layers.items():
        handles.append(
            module.register_forward_hook(
                lambda m, args, out, name=name: inputs.__setitem__(name, args[0].detach().flatten(0, -2))
            )
        )
        handles.append(
            module.register_full_backward_hook(
                lambda m, g_in, g_out, name=name: grads.__setitem__(name, g_out[0].detach().flatten(0, -2))
            )
        )
    with high_precision(model):
        logp_BL1, _ = token_logprobs(model, packed)
        mask = packed.completion_mask_BL1
        (-(logp_BL1 * mask).sum() / mask.sum()).backward()
    for handle in handles:
        handle.remove()
    return [
        (name, inputs[name], layers[name].weight.detach(), grads[name]) for name in layers if name in grads
    ]


def fp8(a_MK, b_NK, a_layout: str | None = "tiles", b_layout: str | None = "blocks") -> torch.Tensor:
    """a @ b.T from FP8 operands (by default `a` in 1 x 128 tiles along K, `b` in 128 x 128 blocks; a
    layout of None leaves that operand exact): the product of the dequantized operands in FP64, so
    that the error is the quantization's alone (with the project's CPU GEMM instead, the figures
    agreed to 4 digits)."""
    return dequantized(a_MK, a_layout).double() @ dequantized(b_NK, b_layout).double().t()


def bf16(a_MK, b_NK) -> torch.Tensor:
    """a @ b.T as a BF16 GEMM computes it: exact products, FP32 sums, a BF16 result."""
    return (a_MK.float() @ b_NK.float().t()).bfloat16()


GEMMS = {  # name: (left operand, right operand) of `a @ b.T`, from (x_MK, w_NK, g_MN)
    "forward": lambda x, w, g: (x, w),
    "input_grad": lambda x, w, g: (g, w.t()),
    "weight_grad": lambda x, w, g: (g.t(), x.t()),
}


def gemm_errors(operands) -> dict[str, float]:
    """Pooled relative error of each GEMM done each way, over all layers' operands: `{gemm}_{way}`."""
    squares: dict[tuple[str, str], float] = {}
    reference: dict[str, float] = {}
    coherence = [0.0, 0.0]  # ||g.T @ x||^2, and the sum over tokens m of ||g_m||^2 ||x_m||^2
    for _, x, w, g in operands:
        for gemm, pick in GEMMS.items():
            a, b = pick(x, w, g)
            exact = a.double() @ b.double().t()
            reference[gemm] = reference.get(gemm, 0.0) + exact.square().sum().item()
            ways = {"bf16": bf16(a, b)}
            if gemm == "weight_grad":
                ways |= weight_gradient_ways(a, b)
                coherence[0] += exact.square().sum().item()
                coherence[1] += (a.double().square().sum(0) * b.double().square().sum(0)).sum().item()
            else:
                ways["fp8"] = fp8(a, b)
            for way, approx in ways.items():
                error = (approx.double() - exact).square().sum().item()
                squares[gemm, way] = squares.get((gemm, way), 0.0) + error
    errors = {f"{gemm}_{way}": (value / reference[gemm]) ** 0.5 for (gemm, way), value in squares.items()}
    return errors | {"weight_grad_coherence": (coherence[0] / coherence[1]) ** 0.5}


def weight_gradient_ways(g_NM, x_KM) -> dict[str, torch.Tensor]:
    """The weight gradient `g.T @ x` (here `g_NM @ x_KM.T`, reducing over the tokens M) from FP8
    operands, several ways: `x.T` in the project's 128 x 128 blocks or in DeepSeek-V3's 128 x 1 tiles;
    one operand quantized and the other exact; and the tokens sorted by the gradient's magnitude
    first (the product is the same in any token order, but each 128-token tile then holds tokens of
    like magnitude: whether tiles that mix large and tiny gradients lose the tiny ones)."""
    order = g_NM.float().abs().amax(dim=0).argsort()
    return {
        "fp8_x_blocks": fp8(g_NM, x_KM),
        "fp8_x_tiles": fp8(g_NM, x_KM, b_layout="tiles"),
        "fp8_g_only": fp8(g_NM, x_KM, b_layout=None),
        "fp8_x_only": fp8(g_NM, x_KM, a_layout=None),
        "fp8_tokens_sorted": fp8(g_NM[:, order], x_KM[:, order]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        recipe = recipe_from_dict(
            {
                "run": {"name": "bf16", "output_dir": scratch, "seed": args.seed},
                "model": {"path": "tiny:deepseek_v3", "dtype": "bfloat16"},
                "sft": {
                    "steps": args.steps,
                    "batch_size": 32,
                    "learning_rate": args.lr,
                    "boxed_fraction": 1.0,
                },
                "train": {"threads": 2, "bf16_moments": True},
            }
        )
        checkpoint = sft(recipe, log=lambda line: print(line, flush=True))["checkpoint"]
        layers = recipe.model.model_copy(update={"fp8": True})
        model = load_policy(checkpoint, "bfloat16", converters_for(layers))
        rows = eval_prompts(recipe.data, args.batch, seed=0)
        operands = capture_operands(model, packed_problems(load_tokenizer(checkpoint), rows))
    errors = gemm_errors(operands)
    kinds = sorted({name.rsplit(".", 1)[-1] for name, *_ in operands})
    by_kind = {kind: gemm_errors([op for op in operands if op[0].endswith("." + kind)]) for kind in kinds}
    print(f"{'':28s} {'all':>8s}" + "".join(f"{kind[:12]:>13s}" for kind in kinds))
    for key, value in errors.items():
        print(f"{key:28s} {value:8.5f}" + "".join(f"{by_kind[kind][key]:13.5f}" for kind in kinds))
    print(
        json.dumps(
            {
                "benchmark": "fp8_gemm_error_cpu",
                "steps": args.steps,
                "seed": args.seed,
                "lr": args.lr,
                "layers": len(operands),
                **{key: round(value, 6) for key, value in errors.items()},
                "by_layer_kind": {
                    kind: {k: round(v, 6) for k, v in e.items()} for kind, e in by_kind.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
