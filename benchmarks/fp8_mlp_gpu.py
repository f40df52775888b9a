"""A shared expert (transformers' SwiGLU MLP: gate and up hidden -> intermediate, down back) forward +
backward in FP8 against BF16, on a CUDA GPU, with and without one quantized input for gate and up
(`grpo.models.fp8_activation_cache`). Shapes: DeepSeek-V3's (7168 -> 2048, 8192 tokens) and the H100
recipe's 0.4 B model's (1024 -> 512, 4096 tokens), where the step is host-bound and the queued time
shows what the cache costs on the CPU.

In the model, `gate_proj` and `up_proj` read the same tensor; each FP8 layer would quantize it, and
with the cache the second finds the first one's copies. One step: forward and backward of the MLP on
the given tokens, the input gradient handed on, the weight gradients accumulated (as
`fp8_linear_gpu.py`'s step; the input stands for a new activation each step). Times as there: queued
(`*_ms`) and from a CUDA graph (`*_graph_ms`, GPU time alone). `same_output`: the FP8 MLP's output
and input gradient are bitwise the same with and without the cache. Last line: one JSON object.

    python3 benchmarks/fp8_mlp_gpu.py
"""

from __future__ import annotations

import copy
import json
from unittest import mock

import torch
from fp8_linear_gpu import step, time_graphed, time_queued
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP

from grpo.models import fp8_activation_cache
from grpo.models.fp8 import convert_to_fp8

SHAPES = [(8192, 7168, 2048), (4096, 1024, 512)]  # tokens, hidden, intermediate


def unshared():
    """No entry kept: gate and up each quantize the input."""
    return mock.patch.object(fp8_activation_cache, "KEPT", 0)


def output_and_input_gradient(mlp, x, grad):
    step(mlp, x, grad)
    return mlp(x).detach(), x.grad.clone()


def measure(tokens: int, hidden: int, intermediate: int) -> dict:
    config = DeepseekV3Config(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu")
    bf16 = DeepseekV3MLP(config).to("cuda", torch.bfloat16)
    for param in bf16.parameters():
        torch.nn.init.normal_(param, std=0.02)
    fp8 = copy.deepcopy(bf16)
    convert_to_fp8(fp8)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)

    times = {
        "bf16": time_queued(bf16, x, grad),
        "bf16_graph": time_graphed(bf16, x, grad),
        "fp8_shared": time_queued(fp8, x, grad),
        "fp8_shared_graph": time_graphed(fp8, x, grad),
    }
    with unshared():
        times["fp8_unshared"] = time_queued(fp8, x, grad)
        times["fp8_unshared_graph"] = time_graphed(fp8, x, grad)
        unshared_result = output_and_input_gradient(fp8, x, grad)
    shared_result = output_and_input_gradient(fp8, x, grad)
    return {
        "shape": f"{tokens}x{hidden}->{intermediate}x2->{hidden}",
        **{f"{name}_ms": round(ms, 3) for name, ms in times.items()},
        **{
            f"{variant}_{kind}speedup": round(times[f"bf16{suffix}"] / times[f"fp8_{variant}{suffix}"], 3)
            for variant in ("unshared", "shared")
            for kind, suffix in (("", ""), ("graph_", "_graph"))
        },
        "same_output": all(torch.equal(a, b) for a, b in zip(shared_result, unshared_result)),
    }


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        rows.append(measure(*shape))
        print(rows[-1], flush=True)
    print(
        json.dumps(
            {
                "benchmark": "fp8_mlp_gpu",
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
