"""DeepGEMM's dense FP8 GEMMs of an `Fp8Linear` step per number of SMs it is told to use, on a Hopper GPU.

DeepGEMM picks its block shape and the number of SMs its persistent kernel runs on from the GEMM's
shape and `set_num_sms` (all of the card's by default). A smaller count can pick another block shape
or fill the last wave better. This times the layer's three GEMMs (forward, input gradient, weight
gradient; operands from the fused quantizers, 8192 tokens) at the two smaller DeepSeek-V3 shapes
through `fp8_deep_gemm.gemm`, as the layer calls it, for each count in SMS: device time per call under
`torch.profiler`, mean of CALLS calls, and whether the product is bitwise the default count's. Every
count is timed twice, in alternating order. Last line: one JSON object.

    python3 benchmarks/probe_deep_gemm_sms_gpu.py
"""

from __future__ import annotations

import json

import torch
from cuda_timing import profiled

from grpo.models import fp8_deep_gemm, fp8_triton

TOKENS = 8192
SHAPES = [(7168, 2048), (2048, 7168)]
SMS = [0, 128, 124, 120, 114, 0, 128, 124, 120, 114]  # 0: the card's own count
CALLS = 20


def kernel_us(call) -> float:
    prof = profiled(call, CALLS)
    return sum(e.device_time_total for e in prof.key_averages() if e.device_time_total > 0) / CALLS


def gemms(fan_in: int, fan_out: int) -> dict:
    """The step's three products as `fp8_deep_gemm.gemm` calls on their quantized operands."""
    x = torch.randn(TOKENS, fan_in, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(TOKENS, fan_out, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16) / fan_in**0.5
    xq, xs, xtq, xts = fp8_triton.quantize_activation(x)
    gq, gs, gtq, gts = fp8_triton.quantize_output_grad(g)
    wq, ws = fp8_triton.quantize_weight_blocks(w)
    wtq, wts = fp8_triton.transpose_blocks(wq, ws)
    return {
        "forward": (xq, xs, wq, ws),
        "input_grad": (gq, gs, wtq, wts),
        "weight_grad": (gtq, gts, xtq, xts),
    }


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    library = fp8_deep_gemm.library(torch.device("cuda"))
    assert library is not None, "DeepGEMM does not load here"
    card = library.get_num_sms()
    torch.manual_seed(0)
    rows = []
    for fan_in, fan_out in SHAPES:
        for name, operands in gemms(fan_in, fan_out).items():

            def call(operands=operands):
                return fp8_deep_gemm.gemm(*operands, torch.bfloat16)

            library.set_num_sms(card)
            reference = call()
            for sms in SMS:
                library.set_num_sms(sms or card)
                us = kernel_us(call)
                same = torch.equal(call(), reference)
                flops = 2 * reference.shape[0] * reference.shape[1] * operands[0].shape[1]
                rows.append({"shape": f"{TOKENS}x{fan_in}->{fan_out}", "gemm": name, "sms": sms or card,
                             "us": round(us, 1), "TFLOP/s": round(flops / us / 1e6), "same": same})  # fmt: skip
                print(rows[-1], flush=True)
            library.set_num_sms(card)
    print(
        json.dumps(
            {"probe": "deep_gemm_sms", "device": torch.cuda.get_device_name(), "sms": card, "rows": rows}
        )
    )


if __name__ == "__main__":
    main()
