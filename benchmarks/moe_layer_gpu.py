"""Routed experts forward + backward on a CUDA GPU: transformers' per-expert loop against the project's
grouped GEMM (`torch._grouped_mm`, BF16), and the project's FP8 experts (one blockwise FP8 GEMM per
expert, `grpo.models.moe.grouped_linear`) against the BF16 grouped path.

All three get the same BF16 weights, tokens and routing (random top-k, weights from a softmax).
Median milliseconds over repeated runs (CUDA events); the FP8 output's relative error against BF16.
`fp8_grouped_*`: the same FP8 experts through the grouped FP8 GEMMs of `grpo.models.fp8_grouped`
(not wired into the layer yet; patched in here), with their output's and input gradient's relative
error against the per-expert FP8 path. Last line: one JSON object.

    python benchmarks/moe_layer_gpu.py
"""

from __future__ import annotations

import json

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

from grpo.models import moe
from grpo.models.fp8_grouped import GroupedFp8Function
from grpo.models.moe import GroupedExperts

# (tokens, hidden, expert intermediate, experts, top-k): DeepSeek-V3's expert shape with fewer experts
# (so that weights and gradients fit one card), and the H100 recipe's model.
SHAPES = [(4096, 7168, 2048, 64, 8), (16384, 1024, 512, 32, 4)]


def median_ms(fn, repeats: int = 10) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(tokens: int, hidden: int, inter: int, experts: int, top_k: int) -> dict:
    config = DeepseekV3Config(
        hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts, hidden_act="silu"
    )
    reference = DeepseekV3Experts(config).to("cuda", torch.bfloat16)
    ours = GroupedExperts(experts, hidden, inter).to("cuda", torch.bfloat16)
    for param in (reference.gate_up_proj, reference.down_proj):
        torch.nn.init.normal_(param, std=0.02)
    ours.gate_up_proj, ours.down_proj = reference.gate_up_proj, reference.down_proj
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    indices = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, device="cuda").softmax(-1)
    grad = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)

    def step(module):
        return lambda: module(x, indices, weights).backward(grad)

    ms_loop = median_ms(step(reference))
    ours.fp8 = False
    ms_grouped = median_ms(step(ours))
    bf16_out = ours(x, indices, weights).detach().float()
    ours.fp8 = True
    ms_fp8 = median_ms(step(ours))
    fp8_out = ours(x, indices, weights).detach().float()
    x.grad = None
    ours(x, indices, weights).backward(grad)
    fp8_dx = x.grad.float()
    per_expert = moe.grouped_linear
    moe.grouped_linear = lambda x_NK, w_EOK, offsets_E, fp8: GroupedFp8Function.apply(
        x_NK, w_EOK, tuple(offsets_E.tolist())
    )
    try:
        ms_fp8_grouped = median_ms(step(ours))
        grouped_out = ours(x, indices, weights).detach().float()
        x.grad = None
        ours(x, indices, weights).backward(grad)
        grouped_dx = x.grad.float()
    finally:
        moe.grouped_linear = per_expert
    return {
        "shape": f"{tokens} tokens, {hidden}->{inter}, {experts} experts top-{top_k}",
        "loop_ms": round(ms_loop, 3),
        "grouped_bf16_ms": round(ms_grouped, 3),
        "fp8_ms": round(ms_fp8, 3),
        "grouped_over_loop_speedup": round(ms_loop / ms_grouped, 3),
        "fp8_over_grouped_bf16_speedup": round(ms_grouped / ms_fp8, 3),
        "fp8_rel_error": round(((fp8_out - bf16_out).norm() / bf16_out.norm()).item(), 4),
        "fp8_grouped_ms": round(ms_fp8_grouped, 3),
        "fp8_grouped_over_grouped_bf16_speedup": round(ms_grouped / ms_fp8_grouped, 3),
        "fp8_grouped_vs_per_expert_rel_error_out": round(
            ((grouped_out - fp8_out).norm() / fp8_out.norm()).item(), 4
        ),
        "fp8_grouped_vs_per_expert_rel_error_dx": round(
            ((grouped_dx - fp8_dx).norm() / fp8_dx.norm()).item(), 4
        ),
    }


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        rows.append(measure(*shape))
        print(rows[-1])
        torch.cuda.empty_cache()
    print(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()
