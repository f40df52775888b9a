"""Times the fused FP8 quantizers (`grpo.models.fp8_triton`) on a CUDA GPU against a plain copy of the same input (the memory-bound floor), and checks each variant
against the portable quantizers; then profiles one `Fp8Linear` forward+backward (GPU time per kernel
against the wall time) and measures the CPU cost of each piece of that step (`cpu_costs`, at the
layer's shape and at a tiny one). Last line: one JSON object.

    PYTHONPATH=. python benchmarks/probe_fp8_quantizers_gpu.py
"""

from __future__ import annotations

import json
import sys
import time

import torch
from cuda_timing import cpu_us_per_call
from triton.testing import do_bench

from grpo.models import fp8_activation_cache, fp8_triton
from grpo.models.fp8 import Fp8Linear, transposed_weight_blocks, weight_blocks

sys.path.insert(0, "tests")
from test_fp8_triton import _exactly_representable, check_against_portable_quantizers  # noqa: E402

CASES = {
    "activation 8192x7168": (fp8_triton.quantize_activation, (8192, 7168)),
    "output_grad 8192x2048": (fp8_triton.quantize_output_grad, (8192, 2048)),
    "weight 2048x7168": (
        lambda w: (blocks := weight_blocks(w, False)) + transposed_weight_blocks(w, False, blocks),
        (2048, 7168),
    ),
}


def correct() -> bool:
    torch.manual_seed(0)
    try:
        check_against_portable_quantizers(_exactly_representable(200, 300).cuda())
        check_against_portable_quantizers((torch.randn(200, 300) * torch.logspace(-3, 3, 300)).cuda())
    except AssertionError:
        return False
    return True


def profile_layer() -> dict:
    layer = Fp8Linear(7168, 2048, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8192, 7168, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)

    def step():
        fp8_activation_cache.forget()  # x stands for a new activation each step
        layer(x).backward(grad)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        step()
    cpu_ms = (time.perf_counter() - start) / 20 * 1e3  # launch-bound if this is the larger
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / 20 * 1e3
    activities = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    kernels, cpu = {}, {}
    for event in prof.key_averages():
        if event.device_time_total > 0:
            kernels[event.key[:80]] = round(event.device_time_total / 10, 1)
        if event.self_cpu_time_total > 0:
            cpu[event.key[:60]] = round(event.self_cpu_time_total / 10, 1)
    kernels = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:8])
    cpu = dict(sorted(cpu.items(), key=lambda kv: -kv[1])[:15])
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            x.grad = layer.weight.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = layer.weight.grad = None
    fp8_activation_cache.forget()
    with torch.cuda.graph(graph):
        layer(x).backward(grad)
    graph_ms = do_bench(graph.replay)
    return {
        "cpu_ms_per_call": round(cpu_ms, 3),
        "wall_ms_per_call": round(wall_ms, 3),
        "cuda_graph_ms_per_call": round(graph_ms, 3),
        "gpu_us": kernels,
        "self_cpu_us": cpu,
    }


def cpu_costs(m: int = 8192, k: int = 7168, n: int = 2048) -> dict:
    """Microseconds per call of each piece of the FP8 step (m x k -> n), from 50 calls queued
    without synchronization. At the real shape a figure may include waiting for the GPU; at a tiny
    shape the GPU work is negligible, so the figures are what Python and the launches cost (on
    2026-11-27 the activation quantizer took 80 us there too: its 98 us at the real shape are CPU
    time, split in `probe_triton_launch_gpu.py`)."""
    from grpo.models.fp8 import fp8_gemm

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    xq, xs, _, _ = fp8_triton.quantize_activation(x.detach())
    wq, ws = fp8_triton.quantize_weight_blocks(w)
    bf16 = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    fp8 = Fp8Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    scale_a, scale_b = xs.t().contiguous().t(), ws.contiguous().t()

    def step(layer):
        x.grad = None
        fp8_activation_cache.forget()  # x stands for a new activation each step
        layer(x).backward(g)

    pieces = {
        "quantize_activation": lambda: fp8_triton.quantize_activation(x.detach()),
        "quantize_activation_rows": lambda: fp8_triton.quantize_activation_rows(x.detach()),
        "quantize_weight_blocks": lambda: fp8_triton.quantize_weight_blocks(w),
        "quantize_output_grad": lambda: fp8_triton.quantize_output_grad(g),
        "fp8_gemm": lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16),
        "_scaled_mm alone": lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16
        ),
        "bf16 mm": lambda: torch.mm(x.detach(), w.t()),
        "empty x4": lambda: [torch.empty(m, k, device="cuda") for _ in range(4)],
        "bf16 layer step": lambda: step(bf16),
        "fp8 layer step": lambda: step(fp8),
    }
    return {name: cpu_us_per_call(fn) for name, fn in pieces.items()}


def main() -> None:
    rows = []
    inputs = {
        name: torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for name, (_, shape) in CASES.items()
    }
    copy_us = {name: round(do_bench(lambda x=x: x.clone()) * 1e3, 1) for name, x in inputs.items()}
    row = {"correct": correct()}
    for name, (quantize, _) in CASES.items():
        row[name + " us"] = round(do_bench(lambda q=quantize, x=inputs[name]: q(x)) * 1e3, 1)
    rows.append(row)
    print(row, flush=True)
    profile = profile_layer()
    print(profile, flush=True)
    cpu_us = cpu_costs()
    print(cpu_us, flush=True)
    cpu_us_tiny = cpu_costs(256, 512, 256)
    print(cpu_us_tiny, flush=True)
    print(
        json.dumps(
            {
                "probe": "fp8_quantizers",
                "device": torch.cuda.get_device_name(),
                "copy_us": copy_us,
                "rows": rows,
                "profile_8192x7168->2048": profile,
                "cpu_us_per_call": cpu_us,
                "cpu_us_per_call_256x512->256": cpu_us_tiny,
            }
        )
    )


if __name__ == "__main__":
    main()
