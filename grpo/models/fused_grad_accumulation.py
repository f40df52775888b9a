"""Weight gradients added into `.grad` by the kernel that computes them (opt-in, scoped).

Over the micro-batches of an optimizer step autograd adds each new weight gradient into `.grad` in a
pass of its own, which reads both gradients and writes the sum. For the FP8 experts at DeepSeek-V3's
shape that pass is a quarter of the layer step's GPU time (5.6 of 23.7 ms on an H100,
`probe_moe_layer_profile_gpu.py`): 64 experts' weights are 2.8 G elements, touched three times, for
512 tokens' worth of GEMMs each. Inside `accumulate_into_grad()` the experts' FP8 weight-gradient
kernel (`fp8_grouped.expert_weight_gradient`) instead adds its FP32 result into the existing `.grad`
as it stores it, and hands autograd no gradient for that weight: one read and one write fewer per
element, and one rounding instead of two. The dense FP8 layers' weight-gradient GEMM does the same on
Hopper (`fp8_deep_gemm.gemm_add_into`: DeepGEMM's epilogue adds its BF16 tile by a TMA reduction, so
two roundings, bitwise autograd's add), which takes 26 us off a 680 us layer step at DeepSeek-V3's
7168 -> 2048 (H100).

Scoped rather than always on, because it goes around autograd's own accumulation: hooks on the
weight's gradient (DDP's reducer, `register_post_accumulate_grad_hook`) do not see the addition, and
`torch.autograd.grad` would not return it. The trainer, which sums gradients across ranks itself after
the backward passes, opens the scope for its train step. The first backward after `zero_grad` finds
no `.grad` and goes through autograd as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_open_scopes = 0  # module-wide, not per thread: autograd runs a CUDA backward on threads of its own
ACCUMULATING_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@contextlib.contextmanager
def accumulate_into_grad() -> Iterator[None]:
    """Let weight-gradient kernels add into `.grad` in place for the duration (scopes nest)."""
    global _open_scopes
    _open_scopes += 1
    try:
        yield
    finally:
        _open_scopes -= 1


def grad_to_add_into(weight: torch.Tensor | None) -> torch.Tensor | None:
    """`weight.grad` where a backward may add the weight's new gradient into it in place: inside the
    scope, not building a graph of the backward (`create_graph`), for a leaf whose `.grad` exists as
    autograd would keep it (dense, contiguous, the weight's shape) and no hook of the weight's
    (`register_hook`, `register_post_accumulate_grad_hook`) to miss it.
    Otherwise None: return the gradient to autograd."""
    if not _open_scopes or weight is None or torch.is_grad_enabled() or not weight.is_leaf:
        return None
    grad = weight.grad
    if (
        grad is None
        or grad.layout != torch.strided
        or not grad.is_contiguous()
        or grad.shape != weight.shape
        or grad.dtype not in ACCUMULATING_DTYPES
        or weight._backward_hooks
        or getattr(weight, "_post_accumulate_grad_hooks", None)
    ):
        return None
    return grad
