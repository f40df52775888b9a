"""The fused FP8 quantizers (`fp8_triton`) per number of warps a program, on a CUDA GPU (the
quantizers' setting, `fp8_triton.warps_for`, replaced by one count for all; the transpose keeps 4).

Each copy `Fp8Linear` makes at DeepSeek-V3's shapes (8192 tokens): the activation (1 x 128 tiles and
its transpose in blocks), the output gradient (tiles both ways), the weight in blocks, and the
weight's transposed copy from its bytes. Every setting is timed twice, in alternating order (a drift
of the card shows as a difference between the two): the kernel's device time under `torch.profiler`,
mean of CALLS calls (host time excluded), and its outputs compared with the default setting's
(`same`: every byte and scale equal). `GB/s` counts bytes read and written; a device-to-device copy
of the activation (`clone`, same profiler) is the bandwidth reference. Last line: one JSON object.

    cd benchmarks && python3 probe_quantizer_warps_gpu.py
"""

from __future__ import annotations

import json
from unittest import mock

import torch
from cuda_timing import kernel_us_per_call

from grpo.models import fp8_triton

WARPS = [4, 8, 16, 4, 8, 16]
CALLS = 20


def outputs_equal(got, want) -> bool:
    def raw(t):
        return t.view(torch.uint8) if t.dtype == fp8_triton.E4M3 else t

    return all(torch.equal(raw(a), raw(b)) for a, b in zip(got, want))


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    x = torch.randn(8192, 7168, device="cuda", dtype=torch.bfloat16)
    g_small = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 7168, device="cuda", dtype=torch.bfloat16)
    wq = fp8_triton.quantize_weight_blocks(w)
    cases = {  # name: (call, bytes moved)
        "activation 8192x7168": (lambda: fp8_triton.quantize_activation(x), x.numel() * 4),
        "output_grad 8192x2048": (lambda: fp8_triton.quantize_output_grad(g_small), g_small.numel() * 4),
        "output_grad 8192x7168": (lambda: fp8_triton.quantize_output_grad(x), x.numel() * 4),
        "weight 2048x7168": (lambda: fp8_triton.quantize_weight_blocks(w), w.numel() * 3),
        "weight transposed 2048x7168": (lambda: fp8_triton.transpose_blocks(*wq), w.numel() * 2),
    }
    reference = {name: call() for name, (call, _) in cases.items()}
    copy_us = kernel_us_per_call(x.clone, CALLS)
    rows = []
    for warps in WARPS:
        with mock.patch.object(fp8_triton, "warps_for", lambda *copies, warps=warps: warps):
            for name, (call, moved) in cases.items():
                us = kernel_us_per_call(call, CALLS)
                same = outputs_equal(call(), reference[name])
                rows.append({"copy": name, "warps": warps, "us": round(us, 1), "GB/s": round(moved / us / 1e3), "same": same})  # fmt: skip
                print(rows[-1], flush=True)
    print(
        json.dumps(
            {
                "probe": "quantizer_warps",
                "device": torch.cuda.get_device_name(),
                "activation_clone_us": round(copy_us, 1),
                "activation_clone_GB/s": round(x.numel() * 4 / copy_us / 1e3),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
