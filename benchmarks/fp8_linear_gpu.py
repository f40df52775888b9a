"""`Fp8Linear` forward + backward against BF16 `nn.Linear` at DeepSeek-V3 shapes, on a CUDA GPU.

For each (tokens, in -> out) shape: median time of forward+backward over repeated runs (CUDA events),
both layers fed the same BF16 input and weights; relative error of the FP8 output and gradients
against an FP32 reference. The FP8 path is `grpo.models.fp8.Fp8LinearFunction` on CUDA: fused Triton
quantizers (`fp8_triton`, each input read once for both of its quantized copies) and cuBLASLt's
blockwise-scaled GEMM. `gemm_only_ms` times the three FP8 GEMMs alone on pre-quantized operands, the
floor the layer can reach. Each step is timed twice: eager (Python's launch overhead included: a
single layer at these sizes is launch-bound in FP8) and replayed from a CUDA graph (GPU time alone).
Last line: one JSON object.

    python benchmarks/fp8_linear_gpu.py
"""

from __future__ import annotations

import json

import torch
from cuda_timing import median_ms
from torch import nn

from grpo.models import fp8_triton
from grpo.models.fp8 import Fp8Linear, fp8_gemm

SHAPES = [(8192, 7168, 2048), (8192, 2048, 7168), (8192, 7168, 18432)]


def time_fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    return median_ms(lambda: layer(x).backward(grad), repeats=20)


def time_fwd_bwd_graphed(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """The same step replayed from a CUDA graph: GPU time alone, without Python's launch overhead
    (what a layer costs inside a model whose GPU queue stays full)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            layer(x).backward(grad)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(x).backward(grad)
    return median_ms(graph.replay, repeats=20)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def gemm_only_ms(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor) -> float:
    xq, xs, xq_t, xs_t = fp8_triton.quantize_activation(x.detach())
    wq, ws, wq_t, ws_t = fp8_triton.quantize_weight(w.detach())
    gq, gs, gq_t, gs_t = fp8_triton.quantize_output_grad(grad)

    def gemms():
        fp8_gemm(xq, xs, wq, ws, torch.bfloat16)
        fp8_gemm(gq, gs, wq_t, ws_t, torch.bfloat16)
        fp8_gemm(gq_t, gs_t, xq_t, xs_t, torch.bfloat16)

    return median_ms(gemms, repeats=20)


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
        graph_bf16, graph_fp8 = time_fwd_bwd_graphed(bf16, x, grad), time_fwd_bwd_graphed(fp8, x, grad)
        # accuracy against FP32
        x.grad = fp8.weight.grad = None
        y = fp8(x)
        y.backward(grad)
        ref = x.float() @ bf16.weight.float().t()
        rel = relative_error(y, ref)
        rel_dx = relative_error(x.grad, grad.float() @ bf16.weight.float())
        rel_dw = relative_error(fp8.weight.grad, grad.float().t() @ x.float())
        flops = 3 * 2 * tokens * fan_in * fan_out
        rows.append(
            {
                "shape": f"{tokens}x{fan_in}->{fan_out}",
                "bf16_ms": round(ms_bf16, 3),
                "fp8_ms": round(ms_fp8, 3),
                "speedup": round(ms_bf16 / ms_fp8, 3),
                "bf16_graph_ms": round(graph_bf16, 3),
                "fp8_graph_ms": round(graph_fp8, 3),
                "graph_speedup": round(graph_bf16 / graph_fp8, 3),
                "bf16_tflops": round(flops / ms_bf16 / 1e9, 1),
                "fp8_tflops": round(flops / ms_fp8 / 1e9, 1),
                "fp8_rel_err_out": round(rel, 5),
                "fp8_rel_err_dx": round(rel_dx, 5),
                "fp8_rel_err_dw": round(rel_dw, 5),
                "gemm_only_ms": round(gemm_only_ms(x, fp8.weight, grad), 3),
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
