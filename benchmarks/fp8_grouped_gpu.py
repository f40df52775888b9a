"""The grouped FP8 expert GEMMs (`grpo.models.fp8_grouped`) one by one against BF16 `torch._grouped_mm`,
on a CUDA GPU.

For each MoE shape (routing drawn at random, so experts get uneven row counts) and each of the three
GEMMs of a linear layer (forward, input gradient, weight gradient): the median time of the FP8
kernel on pre-quantized operands for several kernel configurations, the BF16 grouped GEMM of the
same product, and the FP8 result's relative error against an FP32 product of the same dequantized
operands (only accumulation order and output rounding may differ: a wrong index shows as O(1)).
Then the quantizers each GEMM needs (activation, output gradient, both weight copies) timed alone.
`input_gradient_strided_ms`: the input gradient reading the forward's weight copy by strides (the
right operand then has its outputs contiguous, not its reduction), which would save the transposed
weight copy.
Last line: one JSON object.

    python benchmarks/fp8_grouped_gpu.py
"""

from __future__ import annotations

import json

import torch
import triton

from grpo.models import fp8_triton
from grpo.models.fp8 import dequantize_blocks, dequantize_tiles
from grpo.models.fp8_grouped import (
    ExpertWeights,
    GemmConfig,
    WeightGradientConfig,
    expert_gemm,
    expert_weight_gradient,
    quantize_expert_weights,
)

# (name, tokens, top-k, experts, in features, out features): DeepSeek-V3's expert projections with
# 64 experts, and the H100 recipe model's
SHAPES = [
    ("dsv3 gate_up", 4096, 8, 64, 7168, 4096),
    ("dsv3 down", 4096, 8, 64, 2048, 7168),
    ("h100-recipe gate_up", 16384, 4, 32, 1024, 1024),
    ("h100-recipe down", 16384, 4, 32, 512, 1024),
]
CONFIGS = [
    GemmConfig(block_m=64, group=8, num_warps=4, num_stages=3),
    GemmConfig(block_m=64, group=8, num_warps=4, num_stages=4),
    GemmConfig(block_m=64, group=16, num_warps=4, num_stages=3),
    GemmConfig(block_m=128, group=8, num_warps=8, num_stages=3),
]
WEIGHT_GRADIENT_CONFIGS = [
    WeightGradientConfig(),  # the default: 64 x 128, 4 warps, 3 stages
    WeightGradientConfig(block_n=128, num_warps=8, num_stages=3),
    WeightGradientConfig(block_n=128, num_warps=8, num_stages=4),
    WeightGradientConfig(block_n=128, block_k=256, num_warps=8, num_stages=3),
    WeightGradientConfig(block_n=256, num_warps=8, num_stages=3),
    WeightGradientConfig(block_n=128, block_k=256, num_warps=8, num_stages=4),
    WeightGradientConfig(block_n=256, block_k=256, num_warps=8, num_stages=3),
]


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(((got.float() - want).norm() / want.norm()).item(), 6)


def routed_offsets(tokens: int, top_k: int, experts: int) -> list[int]:
    indices = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=-1).indices
    return torch.bincount(indices.flatten(), minlength=experts).cumsum(0).tolist()


def per_expert(offsets: list[int]):
    return [slice(start, end) for start, end in zip([0, *offsets[:-1]], offsets)]


def weight_gradient_reference(g_t_q, g_t_scale, x_t_q, x_t_scale, offsets: list[int], n: int, k: int):
    """FP32 dW `[E, N, K]` from the same dequantized transposed copies the weight-gradient kernel reads."""
    rows = offsets[-1]
    x_t = dequantize_blocks(x_t_q.float(), x_t_scale)[:k, :rows]
    g_t = dequantize_tiles(g_t_q.float(), g_t_scale.float())[:n, :rows]
    return torch.stack([g_t[:, s] @ x_t[:, s].t() for s in per_expert(offsets)])


def measure(name: str, tokens: int, top_k: int, experts: int, k: int, n: int) -> dict:
    offsets = routed_offsets(tokens, top_k, experts)
    rows = offsets[-1]
    offs = torch.tensor(offsets, device="cuda", dtype=torch.int32)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    g = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * rows * n * k

    xq, xs, xq_t, xs_t = fp8_triton.quantize_activation(x)
    gq, gs, gq_t, gs_t = fp8_triton.quantize_output_grad(g)
    forward, input_gradient = quantize_expert_weights(w)
    # the input gradient read from the forward copy by strides instead of the transposed copy (its
    # right operand then has the outputs contiguous, not the reduction): saves one weight pass
    strided = ExpertWeights(
        forward.q,
        forward.scale,
        (n * forward.q.stride(0), 1, forward.q.stride(0)),
        (n // 128 * forward.scale.stride(0), 1, forward.scale.stride(0)),
        reduction=n,
        outputs=k,
    )
    # FP32 references from the same dequantized operands
    x_deq = dequantize_tiles(xq[:rows].float(), xs[:rows].float())[:, :k]
    g_deq = dequantize_tiles(gq[:rows].float(), gs[:rows].float())[:, :n]
    w_deq = dequantize_blocks(forward.q.float(), forward.scale)[: experts * n, :k].view(experts, n, k)
    spans = per_expert(offsets)
    want_out = torch.cat([x_deq[s] @ w_deq[e].t() for e, s in enumerate(spans)])
    want_dx = torch.cat([g_deq[s] @ w_deq[e] for e, s in enumerate(spans)])
    del x_deq, g_deq, w_deq
    want_dw = weight_gradient_reference(gq_t, gs_t, xq_t, xs_t, offsets, n, k)

    row = {"shape": name, "rows": rows, "experts": experts, "k": k, "n": n}
    row["bf16_ms"] = {
        "forward": ms(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs)),
        "input_gradient": ms(lambda: torch._grouped_mm(g, w, offs=offs)),
        "weight_gradient": ms(lambda: torch._grouped_mm(x.t(), g, offs=offs)),  # as autograd does
    }
    configs = []
    for config in CONFIGS:
        out = expert_gemm(xq, xs, forward, offs, rows, torch.bfloat16, config)
        dx = expert_gemm(gq, gs, input_gradient, offs, rows, torch.bfloat16, config)
        dx_strided = expert_gemm(gq, gs, strided, offs, rows, torch.bfloat16, config)
        configs.append(
            {
                "config": vars(config),
                "forward_ms": ms(
                    lambda c=config: expert_gemm(xq, xs, forward, offs, rows, torch.bfloat16, c)
                ),
                "input_gradient_ms": ms(
                    lambda c=config: expert_gemm(gq, gs, input_gradient, offs, rows, torch.bfloat16, c)
                ),
                "input_gradient_strided_ms": ms(
                    lambda c=config: expert_gemm(gq, gs, strided, offs, rows, torch.bfloat16, c)
                ),
                "rel_error_forward": rel_error(out, want_out),
                "rel_error_input_gradient": rel_error(dx, want_dx),
                "rel_error_input_gradient_strided": rel_error(dx_strided, want_dx),
            }
        )
    row["configs"] = configs
    dw = {}
    for config in WEIGHT_GRADIENT_CONFIGS:
        got = expert_weight_gradient(gq_t, gs_t, xq_t, xs_t, offs, n, k, torch.bfloat16, config)
        dw[",".join(f"{key}={value}" for key, value in vars(config).items())] = {
            "ms": ms(
                lambda c=config: expert_weight_gradient(gq_t, gs_t, xq_t, xs_t, offs, n, k, torch.bfloat16, c)
            ),
            "rel_error": rel_error(got, want_dw),
        }
    row["weight_gradient"] = dw
    stacked = w.reshape(experts * n, k)
    row["quantizer_ms"] = {
        "activation": ms(lambda: fp8_triton.quantize_activation(x)),
        "output_grad": ms(lambda: fp8_triton.quantize_output_grad(g)),
        "expert_weights_both_copies": ms(lambda: quantize_expert_weights(w)),
        "expert_weights_forward_copy": ms(lambda: fp8_triton.quantize_weight_blocks(stacked)),
    }
    best_fwd = min(c["forward_ms"] for c in configs)
    best_dx = min(c["input_gradient_ms"] for c in configs)
    best_dw = min(v["ms"] for v in dw.values())
    bf16 = row["bf16_ms"]
    row["tflops"] = {
        "bf16_forward": round(flops / bf16["forward"] / 1e9, 1),
        "fp8_forward_best": round(flops / best_fwd / 1e9, 1),
        "fp8_input_gradient_best": round(flops / best_dx / 1e9, 1),
        "fp8_weight_gradient_best": round(flops / best_dw / 1e9, 1),
    }
    gemms_bf16 = sum(bf16.values())
    gemms_fp8 = best_fwd + best_dx + best_dw
    quant = row["quantizer_ms"]
    row["three_gemms_fp8_over_bf16_speedup"] = round(gemms_bf16 / gemms_fp8, 3)
    quant_total = quant["activation"] + quant["output_grad"] + quant["expert_weights_both_copies"]
    row["with_quantizers_speedup"] = round(gemms_bf16 / (gemms_fp8 + quant_total), 3)
    return row


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        rows.append(measure(*shape))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    for r in rows:
        best = min(r["configs"], key=lambda c: c["forward_ms"] + c["input_gradient_ms"])
        print(
            f"{r['shape']:>20}: bf16 {r['bf16_ms']} | fp8 best {best['config']} fwd {best['forward_ms']:.3f} "
            f"dx {best['input_gradient_ms']:.3f} | dw {r['weight_gradient']} | quant {r['quantizer_ms']} "
            f"| gemms {r['three_gemms_fp8_over_bf16_speedup']}x, with quantizers {r['with_quantizers_speedup']}x"
        )
    print(
        json.dumps(
            {
                "benchmark": "fp8_grouped_gpu",
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "triton": triton.__version__,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
