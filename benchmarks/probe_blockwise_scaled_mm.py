"""Which scale layouts torch._scaled_mm accepts for 1x128 x 128x128 blockwise FP8 on a GPU, and how fast.

A probe kept for the record (results in benchmarks/results/blockwise_scaled_mm_probe_h100.txt):
the column-major tile scales + transposed block-scale view is the layout `grpo.models.fp8.fp8_gemm` uses.
"""

import torch

from grpo.models.fp8 import dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_tiles

torch.manual_seed(0)
M, K, N = 8192, 7168, 2048
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
xq, xs = quantize_tiles(x)
wq, ws = quantize_blocks(w)  # xs (M, K/128), ws (N/128, K/128)
ref = dequantize_tiles(xq, xs) @ dequantize_blocks(wq, ws).t()


def attempt(name, fn):
    try:
        out = fn()
        torch.cuda.synchronize()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            fn()
        t0.record()
        for _ in range(10):
            fn()
        t1.record()
        torch.cuda.synchronize()
        ms = t0.elapsed_time(t1) / 10
        print(f"OK {name}: rel_err {err:.2e} ms {ms:.3f} TFLOP/s {2 * M * N * K / ms / 1e9:.0f}")
    except Exception as e:
        print(f"FAIL {name}: {str(e)[:300]}")


b = wq.t()  # K x N column-major
attempt(
    "a_scale (M,K/128) rowmajor, b_scale (K/128,N/128)",
    lambda: torch._scaled_mm(xq, b, scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16),
)
attempt(
    "a_scale colmajor (M,K/128), b_scale (N/128,K/128).t()",
    lambda: torch._scaled_mm(
        xq, b, scale_a=xs.t().contiguous().t(), scale_b=ws.t(), out_dtype=torch.bfloat16
    ),
)
attempt(
    "a_scale colmajor, b_scale contiguous (K/128,N/128)",
    lambda: torch._scaled_mm(
        xq, b, scale_a=xs.t().contiguous().t(), scale_b=ws.t().contiguous(), out_dtype=torch.bfloat16
    ),
)
attempt(
    "a_scale colmajor, b_scale (N/128,K/128)",
    lambda: torch._scaled_mm(xq, b, scale_a=xs.t().contiguous().t(), scale_b=ws, out_dtype=torch.bfloat16),
)
try:
    from torch.nn.functional import ScalingType, scaled_mm

    print("F.scaled_mm available")
    attempt(
        "F.scaled_mm BlockWise1x128 x BlockWise128x128",
        lambda: scaled_mm(
            xq,
            b,
            scale_a=xs.t().contiguous().t(),
            scale_recipe_a=ScalingType.BlockWise1x128,
            scale_b=ws.t(),
            scale_recipe_b=ScalingType.BlockWise128x128,
            output_dtype=torch.bfloat16,
        ),
    )
    attempt(
        "F.scaled_mm BlockWise1x128 x BlockWise128x128 (b scale contiguous)",
        lambda: scaled_mm(
            xq,
            b,
            scale_a=xs.t().contiguous().t(),
            scale_recipe_a=ScalingType.BlockWise1x128,
            scale_b=ws.t().contiguous(),
            scale_recipe_b=ScalingType.BlockWise128x128,
            output_dtype=torch.bfloat16,
        ),
    )
except ImportError as e:
    print("no F.scaled_mm", e)
xb = x.clone()


def q():
    return quantize_tiles(xb)


attempt_q = None
for name, fn in [("eager quantize_tiles", q), ("compiled quantize_tiles", torch.compile(quantize_tiles))]:
    try:
        fn(xb) if name.startswith("compiled") else fn()
        torch.cuda.synchronize()
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(10):
            fn(xb) if name.startswith("compiled") else fn()
        t1.record()
        torch.cuda.synchronize()
        print(f"{name}: {t0.elapsed_time(t1) / 10:.3f} ms")
    except Exception as e:
        print(f"FAIL {name}: {str(e)[:300]}")
print("bf16 matmul", end=" ")
attempt("bf16", lambda: x @ w.t())
