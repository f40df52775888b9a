"""Where the 80 us of CPU per fused-quantizer call go (a GPU probe, at a shape where the GPU is idle).

`probe_fp8_quantizers_gpu.py` measured 80 us of CPU per quantizer call even at 256x512, and an FP8
layer step at 1.1 ms of CPU against BF16's 0.2 ms. This splits one `quantize_output_grad` call (both
copies, tiles both ways) into the Triton launch alone (`_quantize_kernel[grid](...)` on preallocated
outputs) and its four allocations (the two FP8 copies and their scales), each timed alone, 200 calls
queued without synchronization, beside one ATen kernel launch for scale. Last line: one JSON object
(microseconds per call).

    python3 benchmarks/probe_triton_launch_gpu.py
"""

from __future__ import annotations

import json
import time

import torch

from grpo.models import fp8_triton


def us_per_call(fn, calls: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return round(elapsed / calls * 1e6, 1)


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(256, 512, dtype=torch.float8_e4m3fn, device="cuda")
    t = torch.empty(512, 512, dtype=torch.float8_e4m3fn, device="cuda")
    q_scale, t_scale = torch.empty(4, 256, device="cuda"), torch.empty(4, 512, device="cuda")

    def launch_only():
        fp8_triton._quantize_kernel[(4, 4)](
            x, x.stride(0), x.stride(1), 256, 512, q, 256, 512, q_scale, q_scale.stride(0),
            t, 512, 512, t_scale, t_scale.stride(0),
            DIRECT=fp8_triton.ROWS, TRANSPOSED=fp8_triton.COLUMNS, POWER_OF_TWO=False, num_warps=4,
        )  # fmt: skip

    def allocations_only():
        return (
            torch.empty(256, 512, dtype=torch.float8_e4m3fn, device="cuda"),
            torch.empty(4, 256, device="cuda"),
            torch.empty(512, 512, dtype=torch.float8_e4m3fn, device="cuda"),
            torch.empty(4, 512, device="cuda"),
        )

    costs = {
        "quantize_output_grad": us_per_call(lambda: fp8_triton.quantize_output_grad(x)),
        "kernel launch alone": us_per_call(launch_only),
        "4 x torch.empty": us_per_call(allocations_only),
        "torch.neg (one aten kernel)": us_per_call(lambda: torch.neg(x)),
    }
    print(costs)
    print(
        json.dumps({"probe": "triton_launch", "device": torch.cuda.get_device_name(), "us_per_call": costs})
    )


if __name__ == "__main__":
    main()
