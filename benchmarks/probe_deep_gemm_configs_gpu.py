"""DeepGEMM's dense FP8 GEMMs of an `Fp8Linear` step per setting of its block-shape heuristic, on Hopper.

DeepGEMM picks its block shape from the GEMM's shape, the number of SMs it is told to use
(`set_num_sms`, all of the card's by default) and the multiples block sizes must be
(`set_block_size_multiple_of`). This times the layer's three GEMMs (forward, input gradient, weight
gradient; operands from the fused quantizers, 8192 tokens) at DeepSeek-V3's three dense shapes
through DeepGEMM's `fp8_gemm_nt` called directly (`fp8_deep_gemm.gemm` would apply its own setting,
`fp8_deep_gemm.use_settings`), for each setting in SETTINGS: device time per call under
`torch.profiler`, mean of CALLS calls, and whether the product is bitwise the default setting's. Every setting is timed twice, in alternating order. Run with `DG_PRINT_CONFIGS=1` to see
the block shapes chosen. Last line: one JSON object.

    python3 benchmarks/probe_deep_gemm_configs_gpu.py
"""

from __future__ import annotations

import json

import torch
from cuda_timing import kernel_us_per_call

from grpo.models import fp8_deep_gemm, fp8_triton

TOKENS = 8192
SHAPES = [(7168, 2048), (2048, 7168), (7168, 18432)]
# (SMs, block rows a multiple of, block columns a multiple of); 0 SMs: the card's own count
SETTINGS = [(0, 1, 1), (128, 1, 32), (124, 1, 32), (120, 1, 32), (112, 1, 32), (124, 1, 1)] * 2
CALLS = 20


def gemms(fan_in: int, fan_out: int) -> dict:
    """The step's three products' quantized operands."""
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


def apply(library, setting: tuple[int, int, int]) -> None:
    sms, m_multiple, n_multiple = setting
    library.set_num_sms(sms)
    library.set_block_size_multiple_of((m_multiple, n_multiple))


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    library = fp8_deep_gemm.library(torch.device("cuda"))
    assert library is not None, "DeepGEMM does not load here"
    card = library.get_num_sms()
    torch.manual_seed(0)
    rows = []
    for fan_in, fan_out in SHAPES:
        for name, operands in gemms(fan_in, fan_out).items():
            a, a_scale, b, b_scale = operands

            def call(a=a, a_scale=a_scale, b=b, b_scale=b_scale):
                out = torch.empty(a.shape[0], b.shape[0], dtype=torch.bfloat16, device="cuda")
                library.fp8_gemm_nt((a, a_scale), (b, b_scale), out)
                return out

            apply(library, (card, 1, 1))
            reference = call()
            for sms, m_multiple, n_multiple in SETTINGS:
                apply(library, (sms or card, m_multiple, n_multiple))
                us = kernel_us_per_call(call, CALLS)
                same = torch.equal(call(), reference)
                flops = 2 * reference.shape[0] * reference.shape[1] * operands[0].shape[1]
                rows.append({"shape": f"{TOKENS}x{fan_in}->{fan_out}", "gemm": name, "sms": sms or card,
                             "block_m_multiple_of": m_multiple, "block_n_multiple_of": n_multiple,
                             "us": round(us, 1), "TFLOP/s": round(flops / us / 1e6), "same": same})  # fmt: skip
                print(rows[-1], flush=True)
            apply(library, (card, 1, 1))
    print(
        json.dumps(
            {"probe": "deep_gemm_configs", "device": torch.cuda.get_device_name(), "sms": card, "rows": rows}
        )
    )


if __name__ == "__main__":
    main()
