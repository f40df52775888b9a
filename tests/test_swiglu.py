"""The experts' fused `silu(gate) * up * weight` kernels against the same function through autograd.

The kernels run in Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1) on FP32 inputs:
37 rows (two row blocks, the second partial) of 300 intermediate columns (a partial column chunk),
the gate and up halves read from a wider tensor's view, as a padded GEMM output can be.
"""

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import run_in_triton_interpreter

ROWS, INTER = 37, 300


def _reference(gate_up_NI2, weights_N, grad_NI):
    """Output and gradients of `silu(gate) * up * weight` by autograd, in FP64."""
    gate_up = gate_up_NI2.detach().double().requires_grad_()
    weights = weights_N.detach().double().requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    out = F.silu(gate) * up * weights.unsqueeze(1)
    out.backward(grad_NI.double())
    return out.detach(), gate_up.grad, weights.grad


def _inputs(device: str, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    wider = torch.randn(ROWS, 2 * INTER + 8, generator=generator) * 3
    gate_up = wider[:, : 2 * INTER].to(device, dtype)  # a view whose rows are 2I + 8 apart
    weights = torch.rand(ROWS, generator=generator).to(device)
    grad = torch.randn(ROWS, INTER, generator=generator).to(device, dtype)
    return gate_up, weights, grad


def check_the_kernels() -> None:
    from grpo.models.swiglu_triton import backward_rows, forward_rows

    gate_up, weights, grad = _inputs("cpu", torch.float32)
    assert gate_up.stride(0) == 2 * INTER + 8
    want_out, want_grad_gate_up, want_grad_weights = _reference(gate_up, weights, grad)
    out = forward_rows(gate_up, weights)
    grad_gate_up, grad_weights = backward_rows(grad, gate_up, weights)
    assert grad_gate_up.shape == (ROWS, 2 * INTER) and grad_weights.shape == (ROWS,)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_gate_up.double(), want_grad_gate_up, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weights.double(), want_grad_weights, rtol=1e-5, atol=1e-4)
    empty = gate_up[:0]
    assert forward_rows(empty, weights[:0]).shape == (0, INTER)


def test_the_swiglu_kernels_in_the_triton_interpreter():
    run_in_triton_interpreter(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_weighted_swiglu_on_the_gpu_within_one_bf16_rounding():
    """BF16 activations, FP32 routing weights: the kernels round each output once, so every value is
    within half a BF16 unit (at most 2^-8 of its size; a hair more for the FP32 arithmetic before)
    of the exact function, and the weights' gradients (FP32 sums of 300 products) within 1e-4."""
    from grpo.models.swiglu import weighted_swiglu

    gate_up, weights, grad = _inputs("cuda", torch.bfloat16)
    gate_up.requires_grad_()
    weights.requires_grad_()
    out = weighted_swiglu(gate_up, weights)
    out.backward(grad)
    want = _reference(gate_up, weights, grad)
    for got, exact in ((out, want[0]), (gate_up.grad, want[1])):
        assert ((got.double() - exact).abs() <= exact.abs() * 2.0**-8 * 1.001 + 1e-12).all()
    torch.testing.assert_close(weights.grad.double(), want[2], rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    check_the_kernels()
