"""Probe: host (CPU) time of the FP8 MoE layer's pieces at the H100 recipe's expert shape (16384
tokens, 1024 -> 512, 32 experts top-4), on a CUDA GPU with DeepGEMM: the padded path's extra work
(`PaddedLayout.of` alone, then with the padded indices and the masked routing weights), one DeepGEMM grouped GEMM call,
one Triton grouped GEMM call, one masked quantizer call (microseconds of CPU per call, 200 calls
queued), and the whole layer step (forward + backward) with `GRPO_DEEP_GEMM` off and on, alternating:
CPU microseconds per step queued, and milliseconds per step synchronized. Last line: one JSON object.

    PYTHONPATH=$PWD:<deep_gemm> python3 benchmarks/probe_moe_host_cost_gpu.py
"""

import json

import torch
from cuda_timing import cpu_us_per_call, median_ms
from moe_layer_gpu import routed_batch

from grpo.models import fp8_deep_gemm, fp8_triton
from grpo.models.fp8_grouped import expert_gemm, quantize_expert_weights
from grpo.models.fp8_grouped_deep_gemm import PaddedLayout, expert_weights, grouped_gemm
from grpo.models.fp8_weight_cache import reuse_quantized_weights
from grpo.models.moe import GroupedExperts, count_per_expert, sort_by_expert


def main() -> None:
    torch.manual_seed(0)
    tokens, hidden, inter, experts, top_k = 16384, 1024, 512, 32, 4
    out = {}
    layer = GroupedExperts(experts, hidden, inter).cuda().to(torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layer.fp8 = True
    x, indices, weights, grad = routed_batch(tokens, hidden, experts, top_k)

    order, inverse = sort_by_expert(indices)
    counts = count_per_expert(indices, experts)

    def padded_extras():
        layout = PaddedLayout.of(counts.cumsum(0).to(torch.int32), order.numel())
        order_p, row = layout.padded_index(order), layout.destination_N[inverse]
        w = torch.where(layout.layout_P >= 0, weights.flatten()[order_p], 0.0)
        return layout, order_p, row, w

    out["padded_layout_us"] = cpu_us_per_call(
        lambda: PaddedLayout.of(counts.cumsum(0).to(torch.int32), order.numel()), calls=200, warmup=10
    )
    out["padded_layout_and_extras_us"] = cpu_us_per_call(padded_extras, calls=200, warmup=10)
    layout = padded_extras()[0]
    lib = fp8_deep_gemm.library(torch.device("cuda"))
    xp = torch.randn(layout.size, hidden, device="cuda", dtype=torch.bfloat16)
    xq, xs = fp8_triton.quantize_activation_rows(xp, False, layout.layout_P)
    with reuse_quantized_weights():
        wts = expert_weights(layer.gate_up_proj, False)
        out["deep_gemm_grouped_call_us"] = cpu_us_per_call(
            lambda: grouped_gemm(lib, xq, xs, wts, layout.layout_P, torch.bfloat16), calls=200, warmup=10
        )
        xq2, xs2 = fp8_triton.quantize_activation_rows(x.detach().repeat_interleave(top_k, 0))
        fwd, _ = quantize_expert_weights(layer.gate_up_proj, input_gradient=False)
        ends = counts.cumsum(0).to(torch.int32)
        out["triton_grouped_call_us"] = cpu_us_per_call(
            lambda: expert_gemm(xq2, xs2, fwd, ends, xq2.shape[0], torch.bfloat16), calls=200, warmup=10
        )
        out["quantize_rows_call_us"] = cpu_us_per_call(
            lambda: fp8_triton.quantize_activation_rows(xp, False, layout.layout_P), calls=200, warmup=10
        )

        def step():
            layer(x, indices, weights).backward(grad)

        for mode in ("off", "on", "off", "on"):
            fp8_deep_gemm.mode = mode
            out.setdefault(f"layer_step_cpu_us_{mode}", []).append(cpu_us_per_call(step, calls=20, warmup=3))
            out.setdefault(f"layer_step_ms_{mode}", []).append(round(median_ms(step, repeats=10), 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
