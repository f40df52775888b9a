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

import torch
from cuda_timing import cpu_us_per_call
from probe_fp8_step_cpu_gpu import through_jit_dispatch

from grpo.models import fp8_triton


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    # the call's own outputs, reused: the kernel writes the same padded buffers, scales through
    # their storage (the call returns the scales as transposed views)
    q, q_scale, t, t_scale = fp8_triton.quantize_output_grad(x)
    q_scale, t_scale = q_scale.t(), t_scale.t()
    grid = (max(q.shape[0], t.shape[1]) // 128, max(q.shape[1], t.shape[0]) // 128, 1)

    args = (
        x, 0, x.stride(0), x.stride(1), *x.shape, x, q, *q.shape, q_scale, q_scale.stride(0),
        t, *t.shape, t_scale, t_scale.stride(0), fp8_triton.ROWS, fp8_triton.COLUMNS, False, False,
    )  # fmt: skip

    def allocations_only():
        return [torch.empty_like(tensor) for tensor in (q, q_scale, t, t_scale)]

    pieces = {
        "quantize_output_grad": lambda: fp8_triton.quantize_output_grad(x),
        "kernel launch alone": lambda: through_jit_dispatch(grid, args),
        "4 x torch.empty": allocations_only,
        "torch.neg (one aten kernel)": lambda: torch.neg(x),
    }
    costs = {name: cpu_us_per_call(fn, calls=200, warmup=10) for name, fn in pieces.items()}
    print(costs)
    print(
        json.dumps({"probe": "triton_launch", "device": torch.cuda.get_device_name(), "us_per_call": costs})
    )


if __name__ == "__main__":
    main()
