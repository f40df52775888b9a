"""The weight gradient added into an FP32 gradient by DeepGEMM's GEMM itself, against the layer's
way, on a Hopper GPU.

`Fp8Linear`'s weight gradient is DeepGEMM's `sm90_fp8_gemm_1d2d` kernel (`x.T` in 128 x 128 blocks,
a BF16 output), which takes no C operand; autograd then adds that output into the BF16 `.grad` in
a pass of its own (25 us of the H100's 680 us step at 8192 x 7168 -> 2048). DeepGEMM's
`sm90_fp8_gemm_1d1d` kernel instead takes both operands in 1 x 128 tiles along the reduction (the
tokens: DeepSeek-V3's own backward layout) and adds its FP32 result into `d` in place (`c=d`), the
gradient-accumulation fusion of Megatron's FP32 `main_grad`. This measures, per dense shape:
- `layer`: the 1d2d GEMM, then `.add_` into a BF16 gradient (what the step runs now);
- `fused`: the 1d1d GEMM accumulating into an FP32 gradient;
- each one's quantizer for `x` (`x` in tiles with `x.T` in blocks, against `x.T` in tiles too);
- BF16's weight gradient both ways: the GEMM then `.add_` into a BF16 gradient (`nn.Linear`'s
  step), and cuBLAS adding its FP32 product into an FP32 gradient (`torch.addmm(out_dtype=...)`),
so the net change of a step: kernel time from `torch.profiler`, mean of CALLS calls, every kernel
listed. Each product is compared with FP32 `g.T @ x` (relative Frobenius error). Last line: one
JSON object.

    PYTHONPATH=<DeepGEMM's folder> python3 benchmarks/probe_deep_gemm_wgrad_accumulate_gpu.py
"""

from __future__ import annotations

import json

import torch
from cuda_timing import kernel_us_by_name, kernel_us_per_call

from grpo.models import fp8_deep_gemm, fp8_triton
from grpo.models.fp8 import trimmed

SHAPES = [(8192, 7168, 2048), (8192, 2048, 7168)]  # tokens, fan in (K), fan out (N)
CALLS = 20


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(((got.float() - want).norm() / want.norm()).item(), 5)


def measure(found, tokens: int, fan_in: int, fan_out: int) -> dict:
    x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(tokens, fan_out, device="cuda", dtype=torch.bfloat16)
    want = g.float().T @ x.float()
    _, _, gq_NM, gs_NL = fp8_triton.quantize_output_grad(g)
    _, _, xq_blocks_KM, xs_blocks = fp8_triton.quantize_activation(x)
    _, _, xq_tiles_KM, xs_tiles = fp8_triton.quantize_output_grad(x)  # x.T in 1 x 128 tiles too
    grad_bf16 = torch.zeros(fan_out, fan_in, device="cuda", dtype=torch.bfloat16)
    grad_fp32 = torch.zeros(fan_out, fan_in, device="cuda", dtype=torch.float32)

    def layer():
        out = fp8_deep_gemm.gemm(gq_NM, gs_NL, xq_blocks_KM, xs_blocks, torch.bfloat16)
        grad_bf16.add_(trimmed(out, fan_out, fan_in))

    def fused():  # the recipe named: vLLM 0.26's DeepGEMM does not infer it from per-row scales on both sides
        fp8_deep_gemm.use_settings(found, grad_fp32.shape)
        found.fp8_gemm_nt((gq_NM, gs_NL), (xq_tiles_KM, xs_tiles), grad_fp32, c=grad_fp32, recipe=(1, 1, 128))

    layer()
    fused()
    row = {
        "shape": f"{tokens}x{fan_in}->{fan_out}",
        "rel_err": {"layer": relative_error(grad_bf16, want), "fused": relative_error(grad_fp32, want)},
    }
    g_t = g.t()  # BF16's weight gradient, as nn.Linear's backward computes it (g.T @ x)

    def bf16_layer():
        grad_bf16.add_(g_t @ x)

    def bf16_fused():  # cuBLAS adding its FP32 product into the FP32 gradient (beta = 1)
        torch.addmm(grad_fp32, g_t, x, out_dtype=torch.float32, out=grad_fp32)

    timed = [("layer", layer), ("fused", fused), ("bf16_layer", bf16_layer)]
    try:
        bf16_fused()
        timed.append(("bf16_fused", bf16_fused))
    except (RuntimeError, TypeError) as error:
        print(f"torch.addmm(out_dtype=float32) did not run: {error}", flush=True)
    for name, fn in timed + timed:
        listed = [(name[:90], round(us, 1)) for name, us in kernel_us_by_name(fn, CALLS)]
        row.setdefault(f"{name}_us", []).append(round(sum(us for _, us in listed), 1))
        row[f"{name}_kernels"] = listed
    for name, quantize in (
        ("blocks", fp8_triton.quantize_activation),
        ("tiles", fp8_triton.quantize_output_grad),
    ):
        row[f"x_quantizer_{name}_us"] = round(kernel_us_per_call(lambda q=quantize: q(x), CALLS), 1)
    return row


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    found = fp8_deep_gemm.library(torch.device("cuda"))
    assert found is not None, "DeepGEMM is not loadable here"
    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        rows.append(measure(found, *shape))
        print(rows[-1], flush=True)
    print(
        json.dumps(
            {"probe": "deep_gemm_wgrad_accumulate", "device": torch.cuda.get_device_name(), "rows": rows}
        )
    )


if __name__ == "__main__":
    main()
