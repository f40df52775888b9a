"""Where the GPU time of one `Fp8Linear` step goes, kernel by kernel, against BF16 `nn.Linear`.

The step of `fp8_linear_gpu.py` (forward + backward of a hidden layer, the weight gradient
accumulating, a new activation every step) at its two smaller DeepSeek-V3 shapes, profiled over
`STEPS` steps with `torch.profiler` (CUDA activity only): each kernel's device time per step and
how many launches per step, largest first; and the last step's quantizer launches one by one, in
launch order (the FP8 forward quantizes w, w.T and x, the backward the output gradient). The layers:
- `bf16` and `fp8`: the weight gradient added into the existing `.grad`, and for FP8 fresh weight
  copies every step (no `reuse_quantized_weights`), as in `fp8_graph_ms`: the figure of record
  since session 14, and a worst case that the trainer never runs (where it adds into `.grad` it
  has the weight's copies already);
- `fp8_reused`: the same inside `reuse_quantized_weights`, as the trainer's micro-batches after an
  optimizer step's first (the weight is unchanged, so its copies are made once);
- `bf16_first` and `fp8_first`: `.grad` set to None before each step, fresh weight copies: the
  trainer's first micro-batch after `zero_grad(set_to_none=True)`, whose weight gradient is stored,
  not added;
- `fp8_into` and `fp8_reused_into`: `fp8` and `fp8_reused` inside the trainer's
  `fused_grad_accumulation.accumulate_into_grad()`, where the weight-gradient GEMM adds into `.grad`
  itself (`fp8_deep_gemm.gemm_add_into`) instead of autograd's add after it;
- `fp8_into_k_compiled` and `fp8_first_k_compiled`: `fp8_into` and `fp8_first` with the weight
  gradient's token count compiled into DeepGEMM's kernel, as before session 35
  (`fp8_deep_gemm.TOKEN_REDUCTION_COMPILED_DIMS`).
Last line: one JSON object.

    python3 benchmarks/probe_fp8_linear_profile_gpu.py
"""

from __future__ import annotations

import contextlib
import json

import torch
from cuda_timing import profiled
from torch import nn

from grpo.models import fp8_activation_cache, fp8_deep_gemm, fp8_weight_cache, fused_grad_accumulation
from grpo.models.fp8 import Fp8Linear

SHAPES = [(8192, 7168, 2048), (8192, 2048, 7168)]
STEPS = 10


LAYERS = {  # name: (layer, weight copies reused, weight gradient added into the existing .grad, in
    # the GEMM, the sides compiled into DeepGEMM's weight-gradient kernel)
    "bf16": (nn.Linear, False, True, False, "n"),
    "fp8": (Fp8Linear, False, True, False, "n"),
    "fp8_into": (Fp8Linear, False, True, True, "n"),
    "fp8_reused": (Fp8Linear, True, True, False, "n"),
    "fp8_reused_into": (Fp8Linear, True, True, True, "n"),
    "bf16_first": (nn.Linear, False, False, False, "n"),
    "fp8_first": (Fp8Linear, False, False, False, "n"),
    "fp8_into_k_compiled": (Fp8Linear, False, True, True, "nk"),
    "fp8_first_k_compiled": (Fp8Linear, False, False, False, "nk"),
}


def kernels_per_step(
    layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, accumulate: bool
) -> tuple[list[dict], list[float]]:
    def step():
        x.grad = None
        if not accumulate:
            layer.weight.grad = None
        fp8_activation_cache.forget()  # x stands for a new activation each step
        layer(x).backward(grad)

    prof = profiled(step, STEPS, warmup=5)
    rows = [
        {
            "kernel": event.key[:100],
            "us": round(event.device_time_total / STEPS, 1),
            "launches": event.count / STEPS,
        }
        for event in prof.key_averages()
        if event.device_time_total > 0
    ]
    quantizers = sorted(
        (event for event in prof.events() if event.name == "_quantize_kernel"),
        key=lambda e: e.time_range.start,
    )
    last_step = [round(event.time_range.elapsed_us(), 1) for event in quantizers[-len(quantizers) // STEPS :]]
    return sorted(rows, key=lambda row: -row["us"]), last_step


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    results = []
    for tokens, fan_in, fan_out in SHAPES:
        x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, fan_out, device="cuda", dtype=torch.bfloat16)
        shape = f"{tokens}x{fan_in}->{fan_out}"
        for name, (layer_type, reused, accumulate, in_gemm, compiled_dims) in LAYERS.items():
            fp8_deep_gemm.TOKEN_REDUCTION_COMPILED_DIMS = compiled_dims
            layer = layer_type(fan_in, fan_out, bias=False, device="cuda", dtype=torch.bfloat16)
            with contextlib.ExitStack() as scopes:
                if reused:
                    scopes.enter_context(fp8_weight_cache.reuse_quantized_weights())
                if in_gemm:
                    scopes.enter_context(fused_grad_accumulation.accumulate_into_grad())
                kernels, quantizers = kernels_per_step(layer, x, grad, accumulate)
            total = round(sum(row["us"] for row in kernels), 1)
            results.append(
                {
                    "shape": shape,
                    "layer": name,
                    "total_us": total,
                    "kernels": kernels,
                    "quantizers_us": quantizers,
                }
            )
            print(f"===== {name} {shape}: {total} us of kernels per step; quantizers {quantizers}")
            for row in kernels:
                print(f"{row['us']:9.1f} us  x{row['launches']:3.1f}  {row['kernel']}")
    print(
        json.dumps({"probe": "fp8_linear_profile", "device": torch.cuda.get_device_name(), "rows": results})
    )


if __name__ == "__main__":
    main()
