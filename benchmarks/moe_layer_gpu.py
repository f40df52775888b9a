"""Routed experts forward + backward on a CUDA GPU: transformers' per-expert loop against the project's
grouped GEMM (`torch._grouped_mm`, BF16), and the project's FP8 experts against the BF16 grouped path.

The FP8 experts run as the layer runs them on CUDA: the grouped FP8 GEMMs of
`grpo.models.fp8_grouped` (`fp8_*`); `fp8_per_expert_*` is the earlier path, one blockwise FP8 GEMM
per expert (`grpo.models.moe.per_expert_fp8`, patched in here), for comparison; `fp8_reused_*` the
FP8 experts inside `reuse_quantized_weights` with unchanged weights (every micro-batch after an
optimizer step's first: the expert weights' quantized copies are reused), `fp8_fused_*` the same also
inside `accumulate_into_grad` (the weight-gradient kernel adds into `.grad`, as in the trainer). The
weight gradients accumulate from step to step in every variant, as over micro-batches.
All get the same BF16 weights, tokens and routing (random top-k, weights from a softmax).
Median milliseconds over repeated runs (CUDA events); relative errors of the FP8 outputs and input
gradients against BF16, and of the grouped FP8 path against the per-expert one. Last line: one JSON
object.

    python benchmarks/moe_layer_gpu.py
"""

from __future__ import annotations

import json

import torch
from cuda_timing import median_ms
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

from grpo.models import moe
from grpo.models.fp8_weight_cache import reuse_quantized_weights
from grpo.models.fused_grad_accumulation import accumulate_into_grad
from grpo.models.moe import GroupedExperts

# (tokens, hidden, expert intermediate, experts, top-k): DeepSeek-V3's expert shape with fewer experts
# (so that weights and gradients fit one card), and the H100 recipe's model.
SHAPES = [(4096, 7168, 2048, 64, 8), (16384, 1024, 512, 32, 4)]


def routed_batch(tokens: int, hidden: int, experts: int, top_k: int):
    """`(x, indices, weights, grad)`: BF16 tokens (a leaf), random top-k routing with softmax weights,
    and an output gradient."""
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    indices = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, device="cuda").softmax(-1)
    grad = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    return x, indices, weights, grad


def measure(tokens: int, hidden: int, inter: int, experts: int, top_k: int) -> dict:
    config = DeepseekV3Config(
        hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts, hidden_act="silu"
    )
    reference = DeepseekV3Experts(config).to("cuda", torch.bfloat16)
    ours = GroupedExperts(experts, hidden, inter).to("cuda", torch.bfloat16)
    for param in (reference.gate_up_proj, reference.down_proj):
        torch.nn.init.normal_(param, std=0.02)
    ours.gate_up_proj, ours.down_proj = reference.gate_up_proj, reference.down_proj
    x, indices, weights, grad = routed_batch(tokens, hidden, experts, top_k)

    def step(module):
        return lambda: module(x, indices, weights).backward(grad)

    def outputs(module):
        x.grad = None
        out = module(x, indices, weights)
        out.backward(grad)
        return out.detach().float(), x.grad.float()

    ms_loop = median_ms(step(reference))
    ours.fp8 = False
    ms_grouped = median_ms(step(ours))
    bf16_out, bf16_dx = outputs(ours)
    ours.fp8 = True
    ms_fp8 = median_ms(step(ours))
    with reuse_quantized_weights():  # a micro-batch after an optimizer step's first
        ms_fp8_reused = median_ms(step(ours))
        with accumulate_into_grad():
            ms_fp8_fused = median_ms(step(ours))
    fp8_out, fp8_dx = outputs(ours)
    grouped_linear = moe.grouped_linear
    moe.grouped_linear = lambda x_NK, w_EOK, offsets_E, fp8: moe.per_expert_fp8(x_NK, w_EOK, offsets_E)
    try:
        ms_per_expert = median_ms(step(ours))
        per_expert_out, per_expert_dx = outputs(ours)
    finally:
        moe.grouped_linear = grouped_linear

    def error(got, want):
        return round(((got - want).norm() / want.norm()).item(), 4)

    return {
        "shape": f"{tokens} tokens, {hidden}->{inter}, {experts} experts top-{top_k}",
        "loop_ms": round(ms_loop, 3),
        "grouped_bf16_ms": round(ms_grouped, 3),
        "fp8_ms": round(ms_fp8, 3),
        "fp8_reused_ms": round(ms_fp8_reused, 3),
        "fp8_fused_ms": round(ms_fp8_fused, 3),
        "fp8_per_expert_ms": round(ms_per_expert, 3),
        "grouped_over_loop_speedup": round(ms_loop / ms_grouped, 3),
        "fp8_over_grouped_bf16_speedup": round(ms_grouped / ms_fp8, 3),
        "fp8_reused_over_grouped_bf16_speedup": round(ms_grouped / ms_fp8_reused, 3),
        "fp8_fused_over_grouped_bf16_speedup": round(ms_grouped / ms_fp8_fused, 3),
        "fp8_per_expert_over_grouped_bf16_speedup": round(ms_grouped / ms_per_expert, 3),
        "fp8_rel_error_out": error(fp8_out, bf16_out),
        "fp8_rel_error_dx": error(fp8_dx, bf16_dx),
        "fp8_vs_per_expert_rel_error_out": error(fp8_out, per_expert_out),
        "fp8_vs_per_expert_rel_error_dx": error(fp8_dx, per_expert_dx),
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
