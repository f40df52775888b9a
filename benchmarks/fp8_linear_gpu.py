"""`Fp8Linear` forward + backward against BF16 `nn.Linear` at DeepSeek-V3 shapes, on a CUDA GPU.

For each (tokens, in -> out) shape: median time of forward+backward over repeated runs (CUDA events),
both layers fed the same BF16 input and weights; relative error of the FP8 output and gradients
against an FP32 reference. The FP8 path is the portable one in `grpo.models.fp8` (quantization in
eager PyTorch, one row-wise scaled GEMM per 128-wide reduction block); the issue's target (>= 1.4x)
needs fused quantization and a native blockwise GEMM. Last line: one JSON object.

    python benchmarks/fp8_linear_gpu.py
"""

from __future__ import annotations

import json

import torch
from torch import nn

from grpo.models.fp8 import Fp8Linear

SHAPES = [(8192, 7168, 2048), (8192, 2048, 7168), (8192, 7168, 18432)]


def time_fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, repeats: int = 20) -> float:
    for _ in range(3):
        layer(x).backward(grad)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        layer(x).backward(grad)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    rows = []
    for tokens, fan_in, fan_out in SHAPES:
        x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, fan_out, device="cuda", dtype=torch.bfloat16)
        bf16 = nn.Linear(fan_in, fan_out, bias=False, device="cuda", dtype=torch.bfloat16)
        fp8 = Fp8Linear(fan_in, fan_out, bias=False, device="cuda", dtype=torch.bfloat16)
        fp8.weight.data.copy_(bf16.weight.data)
        ms_bf16, ms_fp8 = time_fwd_bwd(bf16, x, grad), time_fwd_bwd(fp8, x, grad)
        # accuracy against FP32
        x.grad = None
        y = fp8(x)
        y.backward(grad)
        ref = x.float() @ bf16.weight.float().t()
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        rel_dx = (
            (x.grad.float() - grad.float() @ bf16.weight.float()).norm()
            / (grad.float() @ bf16.weight.float()).norm()
        ).item()
        flops = 3 * 2 * tokens * fan_in * fan_out
        rows.append(
            {
                "shape": f"{tokens}x{fan_in}->{fan_out}",
                "bf16_ms": round(ms_bf16, 3),
                "fp8_ms": round(ms_fp8, 3),
                "speedup": round(ms_bf16 / ms_fp8, 3),
                "bf16_tflops": round(flops / ms_bf16 / 1e9, 1),
                "fp8_tflops": round(flops / ms_fp8 / 1e9, 1),
                "fp8_rel_err_out": round(rel, 5),
                "fp8_rel_err_dx": round(rel_dx, 5),
            }
        )
        print(rows[-1], flush=True)
    print(
        json.dumps(
            {
                "benchmark": "fp8_linear_gpu",
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
