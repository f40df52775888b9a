"""Where the routed experts' GPU time goes: one forward + backward of `GroupedExperts` under the
PyTorch profiler, at the two shapes of `moe_layer_gpu.py`, in BF16 and in FP8 (inside
`reuse_quantized_weights`, as every micro-batch after an optimizer step's first), the FP8 layer also
inside `accumulate_into_grad` ("fused": its weight-gradient kernel adds into `.grad`); each FP8 row
with the weight-gradient kernel of `fp8_grouped_tma` and that of `fp8_grouped` (where DeepGEMM
loads: the padded rows' kernel; elsewhere both rows run `fp8_grouped`'s). Prints the kernels
with the most GPU time, milliseconds per step (mean of 3 profiled steps after 3 warm-up steps; the
weight gradients accumulate from step to step, as over micro-batches). Names longer than 70
characters are cut and tagged with a per-run number, so that different kernels sharing a prefix stay
apart (the tags differ between runs). Last line: one JSON object.

    python3 benchmarks/probe_moe_layer_profile_gpu.py
"""

from __future__ import annotations

import contextlib
import functools
import json
from unittest import mock

import torch
from moe_layer_gpu import SHAPES, routed_batch

from grpo.models import fp8_grouped, fp8_grouped_deep_gemm
from grpo.models.fp8_weight_cache import reuse_quantized_weights
from grpo.models.fused_grad_accumulation import accumulate_into_grad
from grpo.models.moe import GroupedExperts

STEPS = 3
# the FP8 experts' weight-gradient kernel on DeepGEMM's padded rows, each variant run twice in
# alternating order: `fp8_grouped_tma`'s (the layer's) and `fp8_grouped`'s (before session 23)
WEIGHT_GRADIENT_KERNELS = {
    "bulk_copy": contextlib.nullcontext,
    "fp8_grouped": lambda: mock.patch.object(
        fp8_grouped_deep_gemm, "padded_expert_weight_gradient", fp8_grouped.expert_weight_gradient
    ),
}


def layer_step(layer, x, indices, weights, grad) -> None:
    layer(x, indices, weights).backward(grad)


def kernel_ms(step) -> dict[str, float]:
    for _ in range(STEPS):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    table: dict[str, float] = {}
    for event in profile.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.key if len(event.key) <= 70 else f"{event.key[:70]}~{abs(hash(event.key)) % 1000}"
            table[name] = table.get(name, 0.0) + event.self_device_time_total / STEPS / 1000
    return dict(sorted(table.items(), key=lambda item: -item[1]))


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    rows = []
    for tokens, hidden, inter, experts, top_k in SHAPES:
        layer = GroupedExperts(experts, hidden, inter).to("cuda", torch.bfloat16)
        torch.nn.init.normal_(layer.gate_up_proj, std=0.02)
        torch.nn.init.normal_(layer.down_proj, std=0.02)
        x, indices, weights, grad = routed_batch(tokens, hidden, experts, top_k)
        variants = [(False, False, "")] + [
            (True, fused, kernel) for fused in (False, True) for kernel in (*WEIGHT_GRADIENT_KERNELS,) * 2
        ]
        for fp8, fused, kernel in variants:
            layer.fp8 = fp8
            with (
                reuse_quantized_weights(),
                accumulate_into_grad() if fused else contextlib.nullcontext(),
                WEIGHT_GRADIENT_KERNELS.get(kernel, contextlib.nullcontext)(),
            ):
                table = kernel_ms(functools.partial(layer_step, layer, x, indices, weights, grad))
            row = {
                "shape": f"{tokens} tokens, {hidden}->{inter}, {experts} experts top-{top_k}",
                "fp8": fp8,
                "fused_grad_accumulation": fused,
                "weight_gradient_kernel": kernel,
                "total_ms": round(sum(table.values()), 3),
                "kernels_ms": {name: round(ms, 3) for name, ms in list(table.items())[:14]},
            }
            print(row, flush=True)
            rows.append(row)
        torch.cuda.empty_cache()
    print(json.dumps({"probe": "moe_layer_profile", "device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()
