"""`Fp8Linear` forward + backward against BF16 `nn.Linear` at DeepSeek-V3 shapes, on a CUDA GPU.

For each (tokens, in -> out) shape, both layers fed the same BF16 input and weights, one step being
forward + backward of a hidden layer: the weight gradient accumulates (as over micro-batches), the
input gradient is handed on, not accumulated (`x.grad` is reset; a hidden layer's input is no leaf).
Times (CUDA events, medians):
- `*_ms`: steps queued back to back, one synchronization per run of `STEPS` steps: the steady state
  of a layer whose GPU queue stays full, which is the larger of its CPU (launch) and GPU time;
- `*_synced_ms`: every step synchronized alone (Python's launch overhead adds to the GPU time);
- `*_graph_ms`: the step replayed from a CUDA graph (GPU time alone);
- `fp8_reused_ms`, `fp8_reused_graph_ms`: the FP8 step inside `reuse_quantized_weights` with the
  weight unchanged, queued and from a CUDA graph: every micro-batch after an optimizer step's first,
  where the weight's quantized copies are reused;
- `gemm_only_ms`: the three FP8 GEMMs alone on pre-quantized operands, the floor the layer can reach.
Relative error of the FP8 output and gradients against an FP32 reference. The FP8 figures come once
per GEMM library (`fp8_deep_gemm`: cuBLASLt and DeepGEMM by default), each against the same BF16
times. `deep_gemm_k_compiled` is DeepGEMM with the weight gradient's token count compiled into its
kernel, as the layer ran before session 35 (`fp8_deep_gemm.TOKEN_REDUCTION_COMPILED_DIMS`). Last
line: one JSON object.

    python3 benchmarks/fp8_linear_gpu.py [--gemms cublas,deep_gemm,deep_gemm_k_compiled]
"""

from __future__ import annotations

import argparse
import json

import torch
from cuda_timing import median_ms
from torch import nn

from grpo.models import fp8_activation_cache, fp8_deep_gemm, fp8_triton
from grpo.models.fp8 import Fp8Linear, fp8_gemm
from grpo.models.fp8_weight_cache import reuse_quantized_weights

SHAPES = [(8192, 7168, 2048), (8192, 2048, 7168), (8192, 7168, 18432)]


STEPS = 10
LIBRARIES = {"cublas": ("off", "n"), "deep_gemm": ("on", "n"), "deep_gemm_k_compiled": ("on", "nk")}
"""name -> (`fp8_deep_gemm.mode`, `fp8_deep_gemm.TOKEN_REDUCTION_COMPILED_DIMS`)"""


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    x.grad = None
    fp8_activation_cache.forget()  # x stands for a new activation each step
    layer(x).backward(grad)


def time_queued(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    def steps():
        for _ in range(STEPS):
            step(layer, x, grad)

    return median_ms(steps, repeats=10) / STEPS


def time_synced(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    return median_ms(lambda: step(layer, x, grad), repeats=20)


def time_graphed(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """The same step replayed from a CUDA graph: GPU time alone, without Python's launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step(layer, x, grad)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    fp8_activation_cache.forget()
    with torch.cuda.graph(graph):
        layer(x).backward(grad)
    return median_ms(graph.replay, repeats=20)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def gemm_only_ms(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor) -> float:
    xq, xs, xq_t, xs_t = fp8_triton.quantize_activation(x.detach())
    wq, ws = fp8_triton.quantize_weight_blocks(w.detach())
    wq_t, ws_t = fp8_triton.quantize_weight_blocks(w.detach().t())
    gq, gs, gq_t, gs_t = fp8_triton.quantize_output_grad(grad)

    def gemms():
        for _ in range(STEPS):
            fp8_gemm(xq, xs, wq, ws, torch.bfloat16)
            fp8_gemm(gq, gs, wq_t, ws_t, torch.bfloat16)
            fp8_gemm(gq_t, gs_t, xq_t, xs_t, torch.bfloat16, reduces_over_tokens=True)

    return median_ms(gemms, repeats=10) / STEPS


def fp8_figures(
    fp8: nn.Module, bf16: nn.Module, x: torch.Tensor, grad: torch.Tensor, bf16_times: dict
) -> dict:
    """The FP8 layer's times, speedups over `bf16_times` and errors, with the GEMM library set now."""
    times = {
        "fp8": time_queued(fp8, x, grad),
        "fp8_synced": time_synced(fp8, x, grad),
        "fp8_graph": time_graphed(fp8, x, grad),
    }
    with reuse_quantized_weights():
        times["fp8_reused"] = time_queued(fp8, x, grad)
        times["fp8_reused_graph"] = time_graphed(fp8, x, grad)
    # accuracy against FP32
    x.grad = fp8.weight.grad = None
    y = fp8(x)
    y.backward(grad)
    w = bf16.weight.float()
    tokens, fan_in = x.shape
    flops = 3 * 2 * tokens * fan_in * w.shape[0]
    return {
        **{f"{name}_ms": round(ms, 3) for name, ms in times.items()},
        "speedup": round(bf16_times["bf16"] / times["fp8"], 3),
        "synced_speedup": round(bf16_times["bf16_synced"] / times["fp8_synced"], 3),
        "graph_speedup": round(bf16_times["bf16_graph"] / times["fp8_graph"], 3),
        "reused_speedup": round(bf16_times["bf16"] / times["fp8_reused"], 3),
        "reused_graph_speedup": round(bf16_times["bf16_graph"] / times["fp8_reused_graph"], 3),
        "fp8_tflops": round(flops / times["fp8"] / 1e9, 1),
        "fp8_rel_err_out": round(relative_error(y, x.float() @ w.t()), 5),
        "fp8_rel_err_dx": round(relative_error(x.grad, grad.float() @ w), 5),
        "fp8_rel_err_dw": round(relative_error(fp8.weight.grad, grad.float().t() @ x.float()), 5),
        "gemm_only_ms": round(gemm_only_ms(x, fp8.weight, grad), 3),
    }


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gemms",
        default="cublas,deep_gemm",
        help=f"the FP8 GEMM libraries to measure, each against the same BF16 times ({', '.join(LIBRARIES)})",
    )
    gemms = parser.parse_args().gemms.split(",")
    if not set(gemms) <= set(LIBRARIES):
        parser.error(f"--gemms {','.join(gemms)}: each must be one of {', '.join(LIBRARIES)}")
    torch.manual_seed(0)
    rows = []
    for tokens, fan_in, fan_out in SHAPES:
        x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, fan_out, device="cuda", dtype=torch.bfloat16)
        bf16 = nn.Linear(fan_in, fan_out, bias=False, device="cuda", dtype=torch.bfloat16)
        fp8 = Fp8Linear(fan_in, fan_out, bias=False, device="cuda", dtype=torch.bfloat16)
        fp8.weight.data.copy_(bf16.weight.data)
        bf16_times = {
            "bf16": time_queued(bf16, x, grad),
            "bf16_synced": time_synced(bf16, x, grad),
            "bf16_graph": time_graphed(bf16, x, grad),
        }
        flops = 3 * 2 * tokens * fan_in * fan_out
        row = {
            "shape": f"{tokens}x{fan_in}->{fan_out}",
            **{f"{name}_ms": round(ms, 3) for name, ms in bf16_times.items()},
            "bf16_tflops": round(flops / bf16_times["bf16"] / 1e9, 1),
        }
        for gemm in gemms:
            fp8_deep_gemm.mode, fp8_deep_gemm.TOKEN_REDUCTION_COMPILED_DIMS = LIBRARIES[gemm]
            row[gemm] = fp8_figures(fp8, bf16, x, grad, bf16_times)
        rows.append(row)
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
