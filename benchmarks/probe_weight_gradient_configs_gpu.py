"""The experts' FP8 weight-gradient kernel (`fp8_grouped.expert_weight_gradient`) per configuration,
storing dW and adding it into an existing BF16 `.grad` (what the trainer's train step does, inside
`fused_grad_accumulation.accumulate_into_grad`), on a CUDA GPU.

Same operands and routing as `fp8_grouped_gpu.py` (random, uneven rows per expert). The list names
each configuration twice, in alternating order, so that a drift of the card during the run shows as
a difference between the two copies. `err` / `err_into`: relative error of dW against an FP32
product of the same dequantized operands (0.0017 is BF16 output rounding). BF16 `torch._grouped_mm`
of the same product for scale. Last line: one JSON object.

    cd benchmarks && python3 probe_weight_gradient_configs_gpu.py
"""

from __future__ import annotations

import json

import torch
from fp8_grouped_gpu import SHAPES, ms, rel_error, routed_offsets, weight_gradient_reference

from grpo.models import fp8_triton
from grpo.models.fp8_grouped import WeightGradientConfig, expert_weight_gradient

# the default until 2026-11-28
BEFORE = WeightGradientConfig(block_n=128, block_k=128, num_warps=8, num_stages=3)
CONFIGS = [
    BEFORE,
    WeightGradientConfig(block_n=64, block_k=128, num_warps=4, num_stages=3),
    BEFORE,
    WeightGradientConfig(block_n=64, block_k=128, num_warps=4, num_stages=3),
    WeightGradientConfig(block_n=64, block_k=128, num_warps=4, num_stages=4),
    WeightGradientConfig(block_n=128, block_k=128, num_warps=8, num_stages=2),
    WeightGradientConfig(block_n=128, block_k=64, num_warps=4, num_stages=3),
    WeightGradientConfig(block_n=64, block_k=64, num_warps=4, num_stages=3),
    WeightGradientConfig(block_n=64, block_k=128, num_warps=8, num_stages=3),
    WeightGradientConfig(block_n=128, block_k=128, num_warps=4, num_stages=3),
]


def measure(name: str, tokens: int, top_k: int, experts: int, k: int, n: int) -> dict:
    offsets = routed_offsets(tokens, top_k, experts)
    rows = offsets[-1]
    offs = torch.tensor(offsets, device="cuda", dtype=torch.int32)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    _, _, xq_t, xs_t = fp8_triton.quantize_activation(x)
    _, _, gq_t, gs_t = fp8_triton.quantize_output_grad(g)
    want = weight_gradient_reference(gq_t, gs_t, xq_t, xs_t, offsets, n, k)

    def weight_gradient(config, into=None):
        return expert_weight_gradient(gq_t, gs_t, xq_t, xs_t, offs, n, k, torch.bfloat16, config, into=into)

    timings = []
    for config in CONFIGS:
        grad = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.01
        added = weight_gradient(config, into=grad.clone())
        row = {"config": vars(config), "err": rel_error(weight_gradient(config), want)}
        row["err_into"] = rel_error(added.float() - grad.float(), want)
        del added
        row["ms"] = round(ms(lambda c=config: weight_gradient(c)), 3)
        row["into_ms"] = round(ms(lambda c=config, grad=grad: weight_gradient(c, into=grad)), 3)
        timings.append(row)
        print(name, row, flush=True)
        del grad
    bf16_ms = ms(lambda: torch._grouped_mm(x.t(), g, offs=offs))
    return {"shape": name, "bf16_weight_gradient_ms": round(bf16_ms, 3), "configs": timings}


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        rows.append(measure(*shape))
        torch.cuda.empty_cache()
    print(
        json.dumps(
            {
                "benchmark": "probe_weight_gradient_configs_gpu",
                "device": torch.cuda.get_device_name(),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
