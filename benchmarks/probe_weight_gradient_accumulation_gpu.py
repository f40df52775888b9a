"""Probe: the FP8 experts' weight gradient added into an existing `.grad` by the kernel
(`expert_weight_gradient(..., into=grad)`, what `fused_grad_accumulation` turns on) against autograd's
way (the kernel's output, then `grad += output`), at DeepSeek-V3's expert projections: 64 experts of
512 rows each (the padded layout's whole 128-row tiles), BF16 gradients. Median milliseconds (CUDA
events) of: the kernel alone, the kernel plus the add, the kernel adding into `.grad`, this last also
for a few kernel configurations; and the largest difference between the two sums in BF16 units of the
addends' magnitude (one rounding against two: at most about 1). Last line: one JSON object.

    PYTHONPATH=$PWD python3 benchmarks/probe_weight_gradient_accumulation_gpu.py
"""

import json

import torch
from cuda_timing import median_ms

from grpo.models import fp8_triton
from grpo.models.fp8_grouped import WeightGradientConfig, expert_weight_gradient

SHAPES = [("dsv3 gate_up", 4096, 7168), ("dsv3 down", 7168, 2048)]  # (name, out features N, in features K)
EXPERTS, ROWS_PER_EXPERT = 64, 512
CONFIGS = [WeightGradientConfig(), WeightGradientConfig(num_stages=4), WeightGradientConfig(num_warps=4)]


def expert_operands(n: int, k: int, experts: int, rows_per_expert: int):
    """`expert_weight_gradient`'s operands from random BF16 `g` and `x` (the experts' rows in equal
    runs), and a random BF16 `.grad` to add into: `(operands, grad)`."""
    rows = experts * rows_per_expert
    ends = torch.arange(1, experts + 1, device="cuda", dtype=torch.int32) * rows_per_expert
    _, _, g_t_q, g_t_scale = fp8_triton.quantize_output_grad(
        torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    )
    _, _, x_t_q, x_t_scale = fp8_triton.quantize_activation(
        torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    )
    operands = (g_t_q, g_t_scale, x_t_q, x_t_scale, ends, n, k, torch.bfloat16)
    return operands, torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16)


def measure(name: str, n: int, k: int) -> dict:
    operands, grad = expert_operands(n, k, EXPERTS, ROWS_PER_EXPERT)
    row = {
        "shape": f"{name}: {EXPERTS} experts x {ROWS_PER_EXPERT} rows, {k}->{n}",
        "kernel_ms": median_ms(lambda: expert_weight_gradient(*operands)),
        "kernel_then_add_ms": median_ms(lambda: grad.add_(expert_weight_gradient(*operands))),
    }
    for index, config in enumerate(CONFIGS):
        row[f"added_in_kernel_ms_config{index}"] = median_ms(
            lambda config=config: expert_weight_gradient(*operands, config, into=grad)
        )
    row = {key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()}
    before, new = grad.float(), expert_weight_gradient(*operands)
    by_autograd = (grad + new).float()
    in_kernel = expert_weight_gradient(*operands, into=grad).float()
    # a rounding of the sum, and one of the new gradient, are each at most half a unit of the larger
    # of the two addends' magnitudes (BF16: 8 significant bits)
    unit = (before.abs() + new.float().abs()).clamp(min=1e-30) * 2.0**-8
    row["max_difference_in_bf16_units"] = round(((in_kernel - by_autograd).abs() / unit).max().item(), 3)
    row["configs"] = [vars(config) for config in CONFIGS]
    return row


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    results = []
    for shape in SHAPES:
        results.append(measure(*shape))
        print(results[-1], flush=True)
        torch.cuda.empty_cache()
    print(
        json.dumps(
            {"probe": "weight_gradient_accumulation", "device": torch.cuda.get_device_name(), "rows": results}
        )
    )


if __name__ == "__main__":
    main()
