"""The routed experts' activation, `silu(gate) * up * weight` per row, in one pass each way on CUDA.

`moe.GroupedExperts` scales each row of the down projection's input by its routing weight. As
PyTorch ops that is a chain of elementwise kernels (silu, two products, their backwards, a
concatenation of the gate and up gradients and a row sum for the weight's gradient), each a pass
over rows x intermediate values. Here the forward reads the gate and up halves and the weights once
and writes the product; the backward reads the incoming gradient with them once and writes the
gate-and-up gradient as one tensor, and each row's weight gradient. On the H100 that took 0.9 ms
(BF16) and 1.4 ms (FP8) off the layer step at DeepSeek-V3's expert shape, and a fifth off it at the
H100 recipe's (`benchmarks/results/moe_layer_h100.txt`, session 23).

The kernels (`swiglu_triton`) compute in FP32 and round once, where the PyTorch chain rounds each
product to the activations' dtype; elsewhere (CPU) the PyTorch ops run as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _WeightedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up_NI2, weights_N):
        from grpo.models.swiglu_triton import forward_rows

        ctx.save_for_backward(gate_up_NI2, weights_N)
        return forward_rows(gate_up_NI2, weights_N)

    @staticmethod
    def backward(ctx, grad_NI):
        from grpo.models.swiglu_triton import backward_rows

        gate_up_NI2, weights_N = ctx.saved_tensors
        return backward_rows(grad_NI.contiguous(), gate_up_NI2, weights_N)


def weighted_swiglu(gate_up_NI2: torch.Tensor, weights_N: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up * weights[:, None]`, where `gate_up` is `[N, 2I]` (gate, then up, as the
    experts' stacked projection makes them; unit stride along columns): through the kernels on
    CUDA, else PyTorch's ops (the weights then rounded to the activations' dtype first, as before)."""
    if gate_up_NI2.is_cuda and gate_up_NI2.stride(1) == 1 and weights_N.is_contiguous():
        return _WeightedSwiGLU.apply(gate_up_NI2, weights_N)
    gate_NI, up_NI = gate_up_NI2.chunk(2, dim=-1)
    return F.silu(gate_NI) * up_NI * weights_N.unsqueeze(1).to(up_NI.dtype)
